"""ragcache: cache LLM / RAG answers in Redis, under admin-managed policies."""

__version__ = "0.2.0"
