"""Mount with ``path("v1/", include("ragcache.gateway.urls"))``: ``POST /v1/chat/completions``."""
from django.urls import path

from . import views

app_name = "ragcache_gateway"

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat-completions"),
]
