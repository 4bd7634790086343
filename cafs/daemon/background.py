"""Background work that cannot end a mount.

Readahead, prefetch plans and their start-up run in the daemon's one nursery beside the
FUSE loop; an exception escaping any of them would cancel that nursery and detach the mount
(every other file then answers ENOENT). What they do is only ever an optimisation, so a
failure is logged and counted in the mount's stats, and the mount goes on serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cafs.daemon.stats import MountStats

log = logging.getLogger(__name__)


async def contained(stats: MountStats, what: str, fn: Callable[..., Awaitable[Any]],
                    *args: Any) -> None:
    """Await `fn(*args)`; an Exception from it is logged and counted, never raised.
    Cancellation (a BaseException) still passes, so the mount can stop it."""
    try:
        await fn(*args)
    except Exception:
        stats.background_errors += 1
        log.exception("background %s failed (the mount goes on)", what)
