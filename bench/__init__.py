"""mmlm bench package."""
