"""mmlm llm package."""
