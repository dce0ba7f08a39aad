"""Training loop (private)."""
