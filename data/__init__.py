"""mmlm data package."""
