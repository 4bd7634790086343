"""The scenarios; importing this package registers them all in `bench.core.SCENARIOS`.

A new scenario is a module here with a function decorated by `bench.core.register`, and an
import line below.
"""

import bench.scenarios.coldstart
import bench.scenarios.gpuload
import bench.scenarios.indexer
import bench.scenarios.metadata
import bench.scenarios.model
import bench.scenarios.pack
import bench.scenarios.read
import bench.scenarios.startup  # noqa: F401
