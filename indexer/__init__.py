"""cafs: indexer."""
