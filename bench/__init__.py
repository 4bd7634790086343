"""The benchmark suite (`python -m bench`) and the demo; it builds its own images."""
