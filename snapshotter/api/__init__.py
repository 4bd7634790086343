"""Generated gRPC modules for containerd's API and cafs's own (see protogen.py)."""
