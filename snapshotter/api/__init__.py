"""Generated gRPC modules for containerd's API (see protogen.py)."""
