"""Exit 0 if the pyfuse3 this interpreter imports is the patched build cafs wants, else 1.

The Makefile's `pyfuse3-patched` target runs it to decide whether to rebuild. "Wanted"
means: the release named in contrib/pyfuse3/VERSION (the one place the pin lives), with
the feature of every patch in contrib/pyfuse3/series (each patch defines one constant).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The module constant each patch defines: how a build shows it carries the patch.
FEATURES = {
    "fh-falls-back-to-inode.patch": "FH_FALLS_BACK_TO_INODE",
    "read-reply-from-fd.patch": "READ_REPLY_FROM_FD",
}


def problem() -> str | None:
    """Why the installed pyfuse3 is not the wanted build, or None if it is."""
    wanted = (HERE / "VERSION").read_text().strip()
    series = (HERE / "series").read_text().split()
    try:
        import pyfuse3
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    if pyfuse3.__version__ != wanted:
        return f"pyfuse3 {pyfuse3.__version__} is installed, contrib/pyfuse3 pins {wanted}"
    unknown = [name for name in series if name not in FEATURES]
    if unknown:
        return f"contrib/pyfuse3/series names patches check.py does not know: {unknown}"
    missing = [name for name in series if not getattr(pyfuse3, FEATURES[name], False)]
    if missing:
        return f"pyfuse3 {wanted} lacks {', '.join(missing)}"
    return None


def main() -> int:
    why = problem()
    if why is not None:
        print(f"pyfuse3: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
