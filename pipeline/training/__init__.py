"""Training: the one loop every method runs, and its atomic checkpoints."""
