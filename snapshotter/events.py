"""What the snapshotter reports about the FUSE mounts under its remote snapshots.

The core only calls these hooks; `snapshotter.metrics` counts them for Prometheus, so the
snapshotter itself needs no metrics library and its tests need no endpoint.
"""

from __future__ import annotations

from typing import Protocol


class MountEvents(Protocol):
    def mounted(self, seconds: float) -> None:
        """A remote snapshot's FUSE daemon was started and is serving."""
        ...

    def mount_failed(self) -> None:
        """A remote snapshot could not be mounted (the caller gets UNAVAILABLE)."""
        ...

    def remounted(self, reason: str) -> None:
        """A dead daemon's mount was replaced: by the "watchdog", or at "restart"."""
        ...


class Unobserved:
    """The default: nobody is counting."""

    def mounted(self, seconds: float) -> None:
        pass

    def mount_failed(self) -> None:
        pass

    def remounted(self, reason: str) -> None:
        pass
