"""Evaluation harnesses: streaming perplexity (and, later, retrieval tasks)."""
