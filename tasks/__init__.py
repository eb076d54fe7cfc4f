"""mmlm tasks package."""
