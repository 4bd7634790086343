"""cafs: bench."""
