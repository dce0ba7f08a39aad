"""Pure-torch building blocks (private; no AnnData here)."""
