"""cafs: snapshotter."""
