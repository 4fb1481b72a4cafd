"""Celery application for the demo project (standard Django layout)."""
import os

from celery import Celery
from celery.signals import worker_process_shutdown, worker_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
# All Celery settings live in Django settings under the CELERY_ namespace.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _mark_metrics_dead(pid: int) -> None:
    # Prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR shared with the web
    # workers): drop an exiting process's live gauges (other libraries'; ragcache's gauges
    # are read by each scrape, never left in the files), so a dead process never speaks
    # for the present. Its counters stay: totals must not go down.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


@worker_process_shutdown.connect
def _pool_process_exit(pid=None, **kwargs):
    """A prefork pool process is exiting (recycled or shut down)."""
    _mark_metrics_dead(pid or os.getpid())


@worker_shutdown.connect
def _worker_exit(**kwargs):
    """The worker's main process (which also runs tasks under the solo and threads pools)."""
    _mark_metrics_dead(os.getpid())
