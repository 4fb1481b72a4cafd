"""Prometheus multiprocess mode, for real: metrics recorded in one process (a script, a
Celery pool process, a gunicorn worker) show up in a /metrics scrape served by another,
and the gauges of a scrape are read by the process serving it (none is in the shared
files, where an exited process would keep speaking for the present).

The pytest process itself is not in multiprocess mode (prometheus_client picks its value
class at import), so every metrics-producing process here is a subprocess.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis as redis_lib
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REDIS_URL, free_port

ROOT = Path(__file__).resolve().parent.parent
SCRAPE = """
import django
django.setup()
from django.test import Client
response = Client().get("/metrics")
assert response.status_code == 200, response.status_code
print(response.content.decode())
"""


def environment(mp_dir: Path, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        PROMETHEUS_MULTIPROC_DIR=str(mp_dir),
        RAGCACHE_KEY_PREFIX=prefix,
        REDIS_URL=REDIS_URL,
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def migrated_sqlite(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with DATABASE_URL at a fresh, migrated SQLite file of the test's own."""
    env = {**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    env.pop("DATABASE_TEST_NAME", None)
    migrate = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return env


def scrape_gauge_files(mp_dir: Path) -> set[str]:
    """The SCRAPE_GAUGES found in the multiprocess files: there must be none, else a process
    (perhaps long gone) would speak for the present."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from ragcache.metrics import SCRAPE_GAUGES

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(mp_dir))
    return {family.name for family in registry.collect()} & set(SCRAPE_GAUGES)


def test_counter_from_one_process_is_scraped_by_another(tmp_path, ragcache_prefix):
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = migrated_sqlite(tmp_path, environment(mp_dir, ragcache_prefix))
    increment = """
        import os
        import django
        django.setup()
        from ragcache import metrics
        metrics.LOOKUPS.labels("mp-policy", "hit").inc({n})
        metrics.TOKENS_AVOIDED.labels("mp-policy", metrics.model_label("gpt-x")).inc(10 * {n})
        metrics.LOOKUP_SECONDS.labels("mp-policy").observe(0.0003)
        print(os.getpid())
    """
    pids = {int(run_python(increment.format(n=n), env)) for n in (2, 3)}
    # A third writer whose Redis is unreachable: its breaker saw Redis down.
    dead = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    run_python("""
        import django
        django.setup()
        from ragcache import metrics
        from ragcache.services import cache_service
        assert cache_service.get_cached_response("q", model="m") is None
        assert metrics.REDIS_UP.get() == 0
    """, dead)
    assert not scrape_gauge_files(mp_dir)

    text = run_python(SCRAPE, env)
    samples = parse(text)
    # Two writer processes, one scraper that wrote nothing itself: the scrape is the sum.
    mp = {"policy": "mp-policy"}
    assert samples[("ragcache_lookups_total", frozenset({**mp, "result": "hit"}.items()))] == 5
    assert samples[("ragcache_tokens_avoided_total", frozenset({**mp, "model": "gpt-x"}.items()))] == 50
    assert samples[("ragcache_lookup_seconds_count", frozenset(mp.items()))] == 2
    assert samples[("ragcache_lookup_seconds_bucket", frozenset({**mp, "le": "0.0005"}.items()))] == 2
    # The scraper read Redis, the database and the backlog itself, at scrape time: the
    # writer that saw Redis down is not part of it, and each gauge is one sample.
    assert samples[("ragcache_redis_up", frozenset())] == 1
    assert samples[("ragcache_usage_backlog", frozenset())] == 0
    assert samples[("ragcache_usage_lag_seconds", frozenset())] == 0
    assert samples[("ragcache_database_up", frozenset())] == 1
    assert [name for name, _ in samples].count("ragcache_redis_up") == 1
    assert ("ragcache_last_aggregation_timestamp_seconds", frozenset()) not in samples  # never ran: no sample
    assert {f"counter_{pid}.db" for pid in pids} <= {p.name for p in mp_dir.iterdir()}


@pytest.mark.slow
def test_celery_worker_metrics_reach_the_web_scrape(tmp_path, ragcache_prefix):
    """A real Celery worker (prefork) aggregates usage that a script produced; a third
    process serves /metrics with both; the worker's live gauges go when it shuts down."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    queue = f"rctest-{uuid.uuid4().hex[:8]}"
    env = migrated_sqlite(tmp_path, environment(mp_dir, ragcache_prefix, CELERY_QUEUE=queue,
                                                RAGCACHE_LOG_LEVEL="WARNING"))
    before = {p.name for p in mp_dir.iterdir()}  # migrate imported the metrics too

    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", "worker", "-P", "prefork", "-c", "1", "-Q", queue,
         "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "WARNING"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=worker_log,
    )
    client = redis_lib.Redis.from_url(REDIS_URL)
    try:
        producer_pid = int(run_python("""
            import os
            import django
            django.setup()
            from ragcache.services import cache_service
            from ragcache.tasks import aggregate_usage
            answer = {"content": "forty-two", "usage": {"prompt_tokens": 5, "completion_tokens": 7}, "cost": "0.25"}
            assert not cache_service.get_or_call("question", lambda: answer, model="gpt-x").hit
            assert cache_service.get_or_call("question", lambda: answer, model="gpt-x").hit
            aggregate_usage.delay()
            print(os.getpid())
        """, env))
        deadline = time.monotonic() + 60
        while client.get(f"{ragcache_prefix}:2:aggregation:last") is None:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker did not run aggregate_usage within 60 s"
            time.sleep(0.1)
        worker_files = {p.name for p in mp_dir.iterdir()} - before - {f"counter_{producer_pid}.db"}
        assert f"counter_{worker.pid}.db" in worker_files and len(worker_files) >= 2  # main and pool process
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: the shutdown signals run
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        worker_log.close()
        client.close()
        broker = redis_lib.Redis.from_url(settings.CELERY_BROKER_URL)
        broker.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")  # this test's only
        broker.close()

    # The worker and beat set ragcache_redis_up and the last aggregation time in their own
    # memory; none of it is in the files, so no exited process speaks for the present.
    assert not scrape_gauge_files(mp_dir)
    samples = parse(run_python(SCRAPE, env))
    default = {"policy": "default"}
    assert samples[("ragcache_lookups_total", frozenset({**default, "result": "miss"}.items()))] == 1
    assert samples[("ragcache_lookups_total", frozenset({**default, "result": "hit"}.items()))] == 1
    assert samples[("ragcache_stores_total", frozenset({**default, "result": "stored"}.items()))] == 1
    assert samples[("ragcache_tokens_avoided_total", frozenset({**default, "model": "gpt-x"}.items()))] == 12
    # Counted in the Celery pool process, which has exited since: its counters remain.
    assert samples[("ragcache_aggregation_runs_total", frozenset({"result": "ok"}.items()))] == 1
    assert samples[("ragcache_aggregated_events_total", frozenset())] == 3  # miss, store, hit
    assert samples[("ragcache_aggregation_seconds_count", frozenset())] == 1
    assert samples[("ragcache_usage_backlog", frozenset())] == 0
    assert samples[("ragcache_last_aggregation_timestamp_seconds", frozenset())] > 1.7e9  # read from Redis


@pytest.mark.slow
def test_gunicorn_workers_share_metrics_and_each_scrape_reads_its_own_gauges(tmp_path, ragcache_prefix):
    """project/gunicorn.conf.py with two workers recycled every 3 requests: each scrape
    counts every earlier request although the processes that served them are gone, and
    its gauges are the answering worker's own readings, one sample each."""
    mp_dir = tmp_path / "prom"
    port = free_port()
    mp_dir.mkdir()
    env = migrated_sqlite(tmp_path, environment(mp_dir, ragcache_prefix, WEB_CONCURRENCY="2",
                                                RAGCACHE_LOG_LEVEL="WARNING"))
    server_log = (tmp_path / "gunicorn.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "project/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
         "--max-requests", "3"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=server_log,
    )

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    view = ("django_http_requests_total_by_view_transport_method_total",
            frozenset({"view": "ragcache:metrics", "transport": "http", "method": "GET"}.items()))
    try:
        wait_for(lambda: _get(port, "/ragcache/health") is not None, "gunicorn answering")
        seen = []
        for _ in range(12):
            samples = parse(_get(port, "/metrics"))
            seen.append(samples[view])
            # Whichever worker answered, one reading of each gauge, taken by that worker now.
            assert [name for name, _ in samples].count("ragcache_redis_up") == 1
            assert samples[("ragcache_redis_up", frozenset())] == 1
            assert samples[("ragcache_database_up", frozenset())] == 1
        # Consecutive although no process served more than three of these requests.
        assert seen == [seen[0] + i for i in range(12)]
        served_by = {p.name for p in mp_dir.glob("counter_*.db")}
        assert len(served_by) >= 5  # at least four recycled workers plus the current ones
        assert not scrape_gauge_files(mp_dir)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        server_log.close()


def _get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.read().decode()
    except OSError:
        return None
