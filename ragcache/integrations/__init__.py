"""Integrations of ragcache with LLM client libraries (optional extras: ragcache[openai], ragcache[langchain]).

- ``ragcache.integrations.openai``: ``cached(openai.OpenAI())`` puts ``chat.completions.create``
  (JSON and streams, sync and async) behind the cache.
- ``ragcache.integrations.langchain``: ``RagcacheCache``, LangChain's LLM cache on ragcache.
"""
