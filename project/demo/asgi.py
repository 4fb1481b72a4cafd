"""The demo's ASGI entry point (``make run`` serves it with uvicorn): the project's ASGI app,
plus the admin's static files served by Django's own ``ASGIStaticFilesHandler`` (what
``runserver`` does, from the apps' static folders: no ``collectstatic``, no extra package).
For the demo only: in production serve static files with your web server or whitenoise."""
import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
application = ASGIStaticFilesHandler(get_asgi_application())
