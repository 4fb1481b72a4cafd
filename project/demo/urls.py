from django.urls import path

from . import views

urlpatterns = [
    path("", views.demo_page, name="demo"),
    path("ask.json", views.ask_json, name="demo-ask-json"),
]
