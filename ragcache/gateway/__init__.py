"""An OpenAI-compatible caching gateway: ``POST /v1/chat/completions`` as an async Django view.

Point any OpenAI client at ``https://<your site>/v1`` with a gateway key as its API key; the
gateway answers from the cache or forwards to ``RAGCACHE["UPSTREAM"]``. Modules: views.py
(the endpoint), auth.py (gateway keys), controls.py (cache-control headers), payload.py (the
request body), upstream.py (httpx to the upstream), errors.py (OpenAI-shaped errors).
See docs/gateway.md.
"""
