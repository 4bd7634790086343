"""Budgets for hostile images: the most one `cafs index` run may spend, per image.

`umoci unpack` does work in proportion to an image's tar bytes, and so does indexing, with
a few exceptions where a few bytes ask for much more: symlinks whose targets name other
symlinks (resolved again for every path through them), long names whose missing parents
are each a new inode held in memory, a small tree re-encoded into one index per layer of a
long stack of layers, highly compressible layers. Each budget bounds one of these for the
whole image, not per layer; past it the image is refused with a one-line error naming the
budget and the `cafs index` flag that raises it (docs/ARCHITECTURE.md, "Budgets for
hostile images", states the resulting bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _budget(default: int, what: str, unit: str = "", help: str = "") -> Any:
    """A budget field: `what` completes "image refused: ..." (and "refuse an image if
    ..." in its flag's help, unless `help` says otherwise), `unit` "bytes" makes its flag
    take sizes (64G)."""
    return field(default=default, metadata={"what": what, "unit": unit, "help": help})


@dataclass(frozen=True)
class Budgets:
    # 500: overlayfs stacks no more lower layers (OVL_MAX_STACK), so no runtime could run more.
    max_layers: int = _budget(500, "it has more than {} layers")
    # 64 GiB: what one layer may expand to.
    max_layer_bytes: int = _budget(
        64 << 30, "a layer expands to more than {} bytes (a decompression bomb?)", "bytes")
    # 1 TiB: what all layers together may expand to.
    max_image_bytes: int = _budget(
        1 << 40, "its layers expand to more than {} bytes in all", "bytes")
    # 4M: tar entries over all layers, plus the parent directories their paths imply; each
    # is an inode held in memory while indexing (~450 bytes: 4M is ~2 GiB).
    max_entries: int = _budget(
        4_000_000, "its layers hold more than {} entries in all (missing parent "
        "directories count)")
    # 16M: inodes over all its indexes (one per layer, each the whole tree so far).
    max_index_entries: int = _budget(
        16_000_000, "its per-layer indexes would hold more than {} inodes in all "
        "(many layers over a large tree)")
    # 32M (~40 s): symlink target components walked (and the path depth at each hop), over
    # all lookups; umoci takes longer for the same walk (an lstat per component).
    max_link_steps: int = _budget(
        32_000_000, "resolving its paths through symlinks takes more than {} steps in all")
    # 16 MiB: a safetensors header larger than this is not read (the file is then not
    # described as weights; safetensors itself allows 100 MiB).
    max_weights_header: int = _budget(
        16 << 20, "", "bytes", "read no safetensors header larger than N bytes (such a file "
        "is not described as weights in the index)")


NAMES = tuple(f.name for f in fields(Budgets))


class BudgetExceeded(ValueError):
    """The image asks for more work than a budget allows: not indexed."""


def flag(name: str) -> str:
    """The `cafs index` flag that sets budget `name`."""
    return "--" + name.replace("_", "-")


def explain(name: str) -> str:
    """What budget `name` does, for its flag's help ("... than N ...")."""
    meta = next(f.metadata for f in fields(Budgets) if f.name == name)
    return str(meta["help"] or "refuse an image if " + meta["what"].format("N"))


def unit(name: str) -> str:
    return str(next(f.metadata["unit"] for f in fields(Budgets) if f.name == name))


def refusal(name: str, limit: int) -> str:
    """The one-line error for exceeding budget `name` of `limit`."""
    meta = next(f.metadata for f in fields(Budgets) if f.name == name)
    return (f"image refused: {str(meta['what']).format(limit)} (budget {name}; raise it "
            f"with `cafs index {flag(name)} N`)")


class Meter:
    """What one budget has left; `spend` raises BudgetExceeded once it is overdrawn."""

    __slots__ = ("limit", "name", "used")

    def __init__(self, budgets: Budgets, name: str) -> None:
        self.name = name
        self.limit: int = getattr(budgets, name)
        self.used = 0

    def spend(self, amount: int = 1) -> None:
        self.used += amount
        if self.used > self.limit:
            raise BudgetExceeded(refusal(self.name, self.limit))
