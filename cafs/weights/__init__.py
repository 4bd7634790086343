"""The weight loader: a library run inside a model server's own process (and by `cafs
weights`), loading safetensors files to CPU or GPU memory, reading a cafs mount's node-cache
files directly where it can.

Apart so that a model server can import it without the daemon: nothing here imports
cafs.daemon, pyfuse3 or trio (tests/test_layout.py holds it to that); it asks a mount's
daemon over its control socket instead.
"""
