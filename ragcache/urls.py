from django.urls import path

from . import views

app_name = "ragcache"

urlpatterns = [
    path("metrics", views.metrics_view, name="metrics"),
    path("ragcache/health", views.health_view, name="health"),
]
