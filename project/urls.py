from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("demo/", include("project.demo.urls")),
    # The demo's OpenAI-compatible fake LLM (project/demo/fake_upstream.py).
    path("fake-llm/v1/", include("project.demo.fake_upstream")),
    # ragcache's OpenAI-compatible caching gateway: POST /v1/chat/completions (docs/gateway.md).
    path("v1/", include("ragcache.gateway.urls")),
    path("", include("ragcache.urls")),
]
