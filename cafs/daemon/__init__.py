"""The mount daemon: one process per mounted image, serving FUSE with pyfuse3 and trio.

Everything here runs inside that process (started by `cafs/mounts/`, or forked by its mount
server), so only it pays for importing pyfuse3 and trio: the command line, the snapshotter
and a model server's weight loader import none of this.
"""
