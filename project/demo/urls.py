from django.urls import path

from . import documents, views

urlpatterns = [
    path("", views.demo_page, name="demo"),
    path("ask.json", views.ask_json, name="demo-ask-json"),
    # Which demo documents a question cites: the X-Ragcache-Sources a gateway client sends.
    path("sources.json", documents.sources_json, name="demo-sources-json"),
]
