from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("demo/", include("project.demo.urls")),
    # The demo's OpenAI-compatible fake LLM (project/demo/fake_upstream.py).
    path("fake-llm/v1/", include("project.demo.fake_upstream")),
    path("", include("ragcache.urls")),
]
