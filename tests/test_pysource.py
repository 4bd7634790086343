"""The imports a Python source file runs when imported, read by a line scanner."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.pysource import MAX_IMPORTS, Imported, imports

SOURCE = b'''"""A module.

import not_this  (a docstring)
"""
import os, sys as system
import a.b.c as abc  # "quoted" comment
from . import sibling, other as o
from .. import parent
from .pkg.mod import (name_one,
                      name_two as two)
from top.level import \\
    thing
from __future__ import annotations

try:
    import fast_json as json
except ImportError:
    import json
else:
    import after_try

if sys.platform == "linux":
    import linux_only

if TYPE_CHECKING:
    import typing_only

def f():
    import in_function

class C:
    import in_class

    def g(self):
        pass

x = 1; import after_semicolon

if __name__ == "__main__":
    import argparse
import last
'''


def _names(found: list[Imported]) -> list[str]:
    return ["." * i.level + i.module for i in found]


def test_module_level_imports_in_order() -> None:
    found = imports(SOURCE)
    assert _names(found) == ["os", "sys", "a.b.c", ".", "..", ".pkg.mod", "top.level",
                             "__future__", "fast_json", "json", "after_try", "linux_only",
                             "after_semicolon", "last"]
    by_name = {"." * i.level + i.module: i for i in found}
    assert by_name["."].names == ("sibling", "other")
    assert by_name[".pkg.mod"].names == ("name_one", "name_two")
    assert by_name["top.level"].names == ("thing",)


def test_an_except_block_is_the_fallback_of_its_try_block() -> None:
    by_name = {i.module: i for i in imports(SOURCE)}
    tried, fallback = by_name["fast_json"], by_name["json"]
    assert tried.group == fallback.group > 0
    assert not tried.fallback and fallback.fallback
    assert by_name["after_try"].group == 0 and by_name["os"].group == 0


def test_what_runs_later_or_never_is_left_out() -> None:
    names = _names(imports(SOURCE))
    for absent in ("not_this", "typing_only", "in_function", "in_class", "argparse"):
        assert absent not in names


def test_garbage_and_odd_lines_give_nothing() -> None:
    assert imports(b"") == []
    assert imports(b"\xff\xfe\x00import\n from\nimport 3x\nfrom import y\nimport .a\n") == []
    assert imports(b"importlib = 1\nfromage = 2\n") == []


def test_output_is_bounded() -> None:
    many = b"".join(b"import m%d\n" % n for n in range(MAX_IMPORTS * 4))
    assert len(imports(many)) == MAX_IMPORTS


def test_crafted_input_is_scanned_in_bounded_time() -> None:
    """Unclosed brackets, endless continuations, a huge line: linear, not quadratic."""
    for source in (b"(\n" * 200_000, b"import a \\\n" * 100_000, b"x" * 2_000_000,
                   b'"""\n' * 100_000, b"from " + b". " * 500_000 + b"import x\n"):
        started = time.monotonic()
        imports(source)
        assert time.monotonic() - started < 2.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_give_a_bounded_list(source: bytes) -> None:
    found = imports(source)
    assert sum(max(1, len(i.names)) for i in found) <= MAX_IMPORTS
    for item in found:
        assert item.level >= 0 and (item.level or item.module)
