"""ragcache.tasks.aggregate_usage with real Celery workers (subprocesses on the real broker),
a worker killed mid-aggregation, concurrent aggregations, and the database going away.

Every test here checks the rollups against a tally computed by the test itself. The worker
subprocesses open the very test database this process uses (``transactional_db``, so
what each side writes is committed and visible to the other)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import DatabaseError, connection

from ragcache import aggregation, metrics, store
from ragcache.aggregation import aggregate
from ragcache.entries import KIND_RESPONSE, Usage, make_meta
from ragcache.models import ModelPrice, UsageRecord
from ragcache.tasks import aggregate_usage
from ragcache.usage import event_header

from .conftest import REDIS_URL
from .test_aggregation import (
    COUNTS,
    assert_report_equals,
    consumer_names,
    drive_known_mix,
    event_total,
    pending_total,
    report_json,
    rollup_totals,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PRICE_IN, PRICE_OUT = Decimal("0.5"), Decimal("1.5")


# --- synthetic events in ragcache's stream format, with their ground truth -------------------

def empty_tally() -> dict:
    return {**dict.fromkeys(COUNTS, 0), "cost_avoided": Decimal(0), "latency_avoided_ms": 0.0}


def enqueue_events(redis_client, n: int) -> dict[tuple[str, str], dict]:
    """XADD ``n`` events over the 256 shards' streams the way the lookup and store scripts
    write them (pipelined), and return what they must add up to. Hits on model "m-priced"
    carry no cost, so theirs comes from ModelPrice; every other hit carries its own."""
    results = ("hit", "hit", "miss", "store", "refused", "bypass", "shadow_hit")
    policies, models = ("default", "faq", "docs"), ("m-priced", "m-own")
    expected: dict[tuple[str, str], dict] = defaultdict(empty_tally)
    streams = store.current_layout().streams
    now = time.time()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(n):
        result, policy, model = results[i % 7], policies[i % 3], models[(i // 3) % 2]
        fields = {"r": result, "h": event_header(policy, model, "global", f"{i:016x}")}
        tally = expected[(policy, model)]
        counter = {"hit": "hits", "miss": "misses", "shadow_hit": "shadow_hits", "store": "stores",
                   "refused": "refusals", "bypass": "bypasses"}[result]
        tally[counter] += 1
        if result in ("hit", "miss", "shadow_hit"):
            tally["lookups"] += 1
        if result in ("hit", "shadow_hit", "store"):
            pt, ct = i % 50, i % 20
            cost = None if model == "m-priced" else Decimal("0.000123")
            fields["e"] = make_meta(kind=KIND_RESPONSE, model=model, finish_reason="stop", usage=Usage(pt, 0, ct, True),
                                    cost=cost, latency_ms=500.0, created=now, expires=now + 3600)
            fields["w"] = "1000"  # the hit itself took 1 ms (1000 µs)
            if result == "hit":
                tally["tokens_avoided"] += pt + ct
                tally["cost_avoided"] += Decimal(cost) if cost else (PRICE_IN * pt + PRICE_OUT * ct) / 1000
                tally["latency_avoided_ms"] += 499.0
        pipe.xadd(streams[i % len(streams)], fields)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return dict(expected)


def assert_exact(expected: dict, n: int, redis_client) -> None:
    assert UsageRecord.objects.count() == n
    assert rollup_totals("hour", with_latency=True) == expected
    assert rollup_totals("day", with_latency=True) == expected
    assert store.backlog() == 0
    assert pending_total(redis_client) == 0
    # One consumer name, whichever process and however many runs.
    assert set().union(*consumer_names(redis_client)) == {"aggregator"}


@pytest.fixture
def priced(transactional_db):
    ModelPrice.objects.create(model="m-priced", input_per_1k=PRICE_IN, output_per_1k=PRICE_OUT)


# --- worker subprocesses ------------------------------------------------------------------------

def subprocess_database_url() -> str:
    """A DATABASE_URL for the test database this process is using right now."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        name = db["NAME"]
        assert "memory" not in str(name), "worker tests need a file-based SQLite test database"
        return f"sqlite:///{name}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class Worker:
    def __init__(self, prefix: str, queue: str, log_dir: Path, **env: str) -> None:
        self.queue = queue
        self.log_path = log_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "REDIS_URL": REDIS_URL,
            "CELERY_BROKER_URL": django_settings.CELERY_BROKER_URL,
            "RAGCACHE_KEY_PREFIX": prefix,
            "CELERY_QUEUE": queue,
            "DATABASE_URL": subprocess_database_url(),
            "DATABASE_TEST_NAME": str(connection.settings_dict["NAME"]),
            "RAGCACHE_LOG_LEVEL": "INFO",
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        celery = Path(sys.executable).parent / "celery"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(celery), "-A", "project", "worker", "-Q", self.queue, "--pool", "solo", "--concurrency", "1",
                 "-n", f"{self.queue}-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "-l", "INFO"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(condition, what: str, workers: list[Worker], timeout: float = 120.0, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(w.log()[-3000:] for w in workers)
            raise AssertionError(f"timed out waiting for {what}; worker logs:\n{logs}")
        time.sleep(poll)


@pytest.fixture
def workers(ragcache_prefix, tmp_path):
    """Start workers on a queue of this test's own; all are stopped (and the queue's broker
    keys removed) afterwards."""
    queue = f"ragcache-test-{uuid.uuid4().hex[:10]}"
    started: list[Worker] = []

    def start(**env: str) -> Worker:
        worker = Worker(ragcache_prefix, queue, tmp_path, **env).start()
        started.append(worker)
        return worker

    start.queue = queue
    start.started = started
    yield start
    for worker in started:
        worker.stop()
    forget_queue(queue)


def forget_queue(queue: str) -> None:
    """Remove this queue's broker keys, and the task message a SIGKILLed worker leaves in
    kombu's shared 'unacked' hash (otherwise restored into the dead queue an hour later)."""
    import redis as redis_lib

    broker = redis_lib.Redis.from_url(django_settings.CELERY_BROKER_URL)
    try:
        for tag, payload in broker.hscan_iter("unacked"):
            try:
                routed_to = json.loads(payload)[-1]
            except (ValueError, IndexError, KeyError, TypeError):
                continue
            if routed_to == queue:
                broker.hdel("unacked", tag)
                broker.zrem("unacked_index", tag)
        broker.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    finally:
        broker.close()


def send_aggregation(queue: str) -> None:
    aggregate_usage.apply_async(queue=queue)


def aggregated_lines(worker: Worker) -> list[tuple[int, int]]:
    """(ingested, duplicates) from the worker's 'aggregated N usage events' log lines."""
    import re

    return [(int(a), int(b)) for a, b in re.findall(r"aggregated (\d+) usage events \((\d+) duplicates", worker.log())]


# --- tests ----------------------------------------------------------------------------------------

def test_real_worker_aggregates_the_known_mix(transactional_db, policy_factory, redis_client, workers):
    expected = drive_known_mix(policy_factory, "worker")
    events = event_total(expected)
    worker = workers()
    send_aggregation(workers.queue)
    wait_for(lambda: aggregated_lines(worker), "the worker's aggregation", [worker])

    assert UsageRecord.objects.count() == events
    assert rollup_totals("hour") == expected and rollup_totals("day") == expected
    assert store.backlog() == 0
    assert aggregated_lines(worker) == [(events, 0)]
    assert_report_equals(report_json(), expected)
    print(f"\nreal worker: {events} events from cache_service aggregated exactly: {aggregated_lines(worker)}")


def test_worker_killed_mid_aggregation_loses_and_double_counts_nothing(priced, redis_client, workers):
    n = 20_000
    expected = enqueue_events(redis_client, n)
    assert store.backlog() == n
    first = workers(RAGCACHE_AGGREGATE_BATCH="500", RAGCACHE_AGGREGATION_LOCK_TIMEOUT="2")
    send_aggregation(workers.queue)
    # Kill it once a batch is committed and another is in flight (read, not yet acknowledged).
    in_flight = lambda: pending_total(redis_client) > 0  # noqa: E731
    wait_for(lambda: UsageRecord.objects.exists() and in_flight(), "a committed batch", [first], poll=0.002)
    first.kill()
    written_before_kill = UsageRecord.objects.count()
    pending_after_kill = pending_total(redis_client)
    assert 0 < written_before_kill < n, "the worker must die mid-aggregation"
    assert store.last_aggregation() is None

    # Its lock outlives it by at most AGGREGATION_LOCK_TIMEOUT; then a new worker takes over.
    lock = store.current_layout().aggregation_lock
    wait_for(lambda: not redis_client.exists(lock), "the dead worker's lock to expire", [first])
    second = workers(RAGCACHE_AGGREGATE_BATCH="500", RAGCACHE_AGGREGATION_LOCK_TIMEOUT="2")
    send_aggregation(workers.queue)
    wait_for(lambda: aggregated_lines(second), "the second worker's aggregation", [second])

    assert_exact(expected, n, redis_client)
    ((ingested, duplicates),) = aggregated_lines(second)
    assert ingested == n - written_before_kill
    assert duplicates <= pending_after_kill  # committed but never acknowledged: skipped, not re-counted
    print(f"\nkill test: {n} events; killed after {written_before_kill} rows committed, {pending_after_kill} events "
          f"pending; second worker ingested {ingested}, skipped {duplicates} duplicates; totals exact")


def test_two_workers_at_once_count_everything_once(priced, redis_client, workers):
    n = 6_000
    expected = enqueue_events(redis_client, n)
    pair = [workers(RAGCACHE_AGGREGATE_BATCH="300") for _ in range(2)]
    for _ in range(4):
        send_aggregation(workers.queue)
    logged = lambda: sum(ingested for w in pair for ingested, _ in aggregated_lines(w))  # noqa: E731
    wait_for(lambda: logged() >= n, "both workers to finish", pair)
    assert_exact(expected, n, redis_client)
    assert logged() == n


def _run_until_drained(errors: list, results: list) -> None:
    """What beat plus Celery's autoretry do: run aggregate() until the stream is empty,
    retrying after a database error (a lost race on the unique event id, a deadlock).
    Acknowledged events are deleted, so an empty stream means every event is in."""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                result = aggregate()
            except DatabaseError as exc:
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:40]}")
                continue
            results.append(result)
            if result.status == "ok" and result.backlog == 0:
                return
            time.sleep(0.01)
    finally:
        connection.close()


def test_concurrent_aggregations_wait_for_the_lock(priced, redis_client, settings, monkeypatch):
    settings.RAGCACHE = {**settings.RAGCACHE, "AGGREGATE_BATCH": 200}
    n = 3_000
    expected = enqueue_events(redis_client, n)
    in_first_batch, release = threading.Event(), threading.Event()
    real_ingest = aggregation.ingest

    def ingest_and_pause(entries, result):
        real_ingest(entries, result)
        if not in_first_batch.is_set():
            in_first_batch.set()
            release.wait(30)  # hold the aggregation (and its lock) open mid-run

    monkeypatch.setattr(aggregation, "ingest", ingest_and_pause)
    errors, results = [], []
    runner = threading.Thread(target=_run_until_drained, args=(errors, results), daemon=True)
    runner.start()
    assert in_first_batch.wait(30)
    other = aggregate()  # a second aggregation while the first is mid-run
    release.set()
    runner.join(60)
    assert other.status == "busy" and other.ingested == 0
    assert errors == []
    assert_exact(expected, n, redis_client)


def test_concurrent_aggregations_without_the_lock_still_count_once(priced, redis_client, settings):
    """Even when the lock is lost (it expires mid-run: a stalled worker), the unique event
    id and the one-transaction batch keep the totals exact; losers retry."""
    settings.RAGCACHE = {**settings.RAGCACHE, "AGGREGATE_BATCH": 100, "AGGREGATION_LOCK_TIMEOUT": 0.001}
    n = 2_000
    expected = enqueue_events(redis_client, n)
    errors, results = [], []
    threads = [threading.Thread(target=_run_until_drained, args=(errors, results), daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert_exact(expected, n, redis_client)
    print(f"\nno-lock race: {n} events, {len(results)} runs, {sum(r.duplicates for r in results)} duplicates "
          f"skipped, {len(errors)} retried database errors {sorted(set(errors))}")



def test_database_outage_makes_the_task_retry_and_keeps_events_pending(priced, redis_client, broken_database):
    n = 700
    expected = enqueue_events(redis_client, n)
    broken_database()

    with pytest.raises(DatabaseError):
        aggregate_usage()  # called directly, Celery re-raises what autoretry would retry on
    assert store.backlog() == n  # nothing acknowledged, nothing lost
    assert pending_total(redis_client) == n  # read in one batch (under 100 per shard), then the database failed
    assert not redis_client.exists(store.current_layout().aggregation_lock)  # released for the retry

    errors_before = metrics.AGGREGATION_RUNS.labels("error")._value.get()
    outcome = aggregate_usage.apply()  # in-process: shows the autoretry policy itself
    assert outcome.state == "FAILURE" and isinstance(outcome.result, DatabaseError)
    assert metrics.AGGREGATION_RUNS.labels("error")._value.get() - errors_before == 1 + aggregate_usage.max_retries
    assert store.backlog() == n

    broken_database.restore()
    result = aggregate_usage()
    assert (result["status"], result["ingested"], result["duplicates"], result["malformed"]) == ("ok", n, 0, 0)
    assert_exact(expected, n, redis_client)
