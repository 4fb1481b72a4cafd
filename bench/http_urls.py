"""The project's URLs plus ``/bench/plain.json``: the demo's bytes straight from django-redis,
the "no ragcache" baseline for ``bench/hotpath.py --http``."""
import os

from django.core.cache import caches
from django.http import HttpRequest, HttpResponse
from django.urls import include, path

PLAIN_KEY = f"{os.environ.get('RAGCACHE_KEY_PREFIX', 'ragcache')}:plain"


def plain_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(caches["ragcache"].get(PLAIN_KEY), content_type="application/json")


urlpatterns = [
    path("bench/plain.json", plain_view),
    path("", include("project.urls")),
]
