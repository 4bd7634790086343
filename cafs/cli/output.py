"""Console output of the command line: rich, imported only once something is printed (importing
it costs more than `cafs mount` through a mount server takes), and text that images and
stores control shown as text, never as markup."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from cafs.terminal import shown

if TYPE_CHECKING:
    from rich.console import Console


@cache
def console(stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def markup(text: object) -> str:
    """Text for rich's markup, which images and stores control: control characters
    escaped (cafs/terminal.py), and brackets, which rich would read as markup."""
    from rich.markup import escape

    return escape(shown(str(text)))
