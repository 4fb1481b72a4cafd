"""Integrations of ragcache with LLM client libraries (optional extras: ragcache[openai], ragcache[langchain])."""
