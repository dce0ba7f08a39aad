"""Tools that work on a fitted model."""

__all__: list[str] = []
