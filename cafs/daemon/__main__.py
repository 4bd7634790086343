"""`python -m cafs.daemon SOURCE MOUNTPOINT --config JSON`: how a daemon is spawned
(cafs/mounts/mount.py), and the command line `ps` and the snapshotter's liveness check read."""

import sys

from cafs.daemon.main import main

sys.exit(main())
