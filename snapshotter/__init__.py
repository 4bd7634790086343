"""cafs: the containerd proxy snapshotter and `cafs pull`."""

CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"

