"""The scenarios; importing this package registers them all in `bench.core.SCENARIOS`.

A new scenario is a module here with a function decorated by `bench.core.register`, and an
import line below.
"""

from bench.scenarios import indexer, metadata, read, startup

__all__ = ["indexer", "metadata", "read", "startup"]
