"""cafs: cafs."""
