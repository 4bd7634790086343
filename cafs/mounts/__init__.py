"""Starting, finding and stopping mount daemons, run by their clients: `cafs mount`, `cafs
run`, the snapshotter, the mount server (a process that forks daemons) and its metrics.

Kept apart from the daemon itself so that a client imports neither pyfuse3 nor trio: this
is the only part of cafs the snapshotter needs besides the shared top-level modules.
"""
