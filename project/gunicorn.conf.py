"""gunicorn settings for the demo project:  gunicorn -c project/gunicorn.conf.py

Several workers means several processes, each with its own metrics. For /metrics to
show the sum over all of them (and over the Celery workers), export the same
PROMETHEUS_MULTIPROC_DIR to gunicorn and to Celery, pointing at a directory that is
emptied once before both start (see docs/observability.md). Without it, each scrape
shows only the worker that happened to answer.
"""
import os

wsgi_app = "project.wsgi:application"
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))


def on_starting(server):
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
    elif server.cfg.workers > 1:
        server.log.warning("PROMETHEUS_MULTIPROC_DIR is not set: each /metrics scrape shows one worker's numbers.")


def child_exit(server, worker):
    # A worker died or was recycled: drop its live gauges (its counters stay in the sum).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
