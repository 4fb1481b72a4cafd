"""Shared fixtures. Every test talks to the real Redis at REDIS_URL, under a key prefix
of its own that is deleted afterwards (never FLUSHDB: the server may be shared)."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis as redis_lib

from ragcache import store
from ragcache.policies import registry

# The local Redis Cluster (3 masters + 3 replicas) and the contract's ``backend`` fixture.
from .cluster import backend, cluster_backend, one_slot_guard, redis_cluster  # noqa: F401

# The OpenAI-compatible gateway on the live server below, its upstream the fake (tests/gateway_helpers.py).
from .gateway_helpers import gateway  # noqa: F401

# The project's ASGI app under uvicorn on a free port, and the fake OpenAI upstream on it.
from .upstream import asgi_server, fake_llm  # noqa: F401

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


# Tests that are not about timeouts must not depend on a quiet server: the shared Redis
# may be loaded by other clients. Fault tests use private servers with the production
# timeout (PrivateRedis.TIMEOUT).
TEST_SOCKET_TIMEOUT = 2.0


@pytest.fixture(autouse=True)
def ragcache_prefix(settings):
    """A fresh key prefix per test; its keys are removed afterwards."""
    prefix = f"rctest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # Step lines inline, so caplog sees them at once (tests/test_steplog_queue.py covers the queue).
    settings.RAGCACHE = {**settings.RAGCACHE, "KEY_PREFIX": prefix, "STEP_LOG_QUEUE": False}
    alias = settings.RAGCACHE.get("CACHE_ALIAS", "ragcache")
    caches = {**settings.CACHES}
    caches[alias] = {**caches[alias], "OPTIONS": {**caches[alias].get("OPTIONS", {}),
                                                  "SOCKET_TIMEOUT": TEST_SOCKET_TIMEOUT,
                                                  "SOCKET_CONNECT_TIMEOUT": TEST_SOCKET_TIMEOUT}}
    settings.CACHES = caches
    registry.invalidate()
    store.reset_clients()
    yield prefix
    registry.invalidate()
    client = redis_lib.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.unlink(*keys)
    except redis_lib.RedisError:
        pass
    finally:
        client.close()


@pytest.fixture
def ragcache_log(caplog):
    """caplog for the "ragcache" loggers, at DEBUG: they do not propagate to the root logger."""
    logger = logging.getLogger("ragcache")
    old_level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)


@pytest.fixture
def redis_client():
    client = redis_lib.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def policy_factory(db):
    """Create or update a CachePolicy and make the running process see it at once
    (in a test transaction, on_commit announcements never fire)."""
    from ragcache.models import CachePolicy

    def make(name: str = "default", **fields):
        policy, _ = CachePolicy.objects.update_or_create(name=name, defaults=fields)
        registry.invalidate()
        return policy

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own on a free port, to stop and start at will."""

    TIMEOUT = 0.1  # the production socket timeout: fault tests measure against it

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             # DEBUG SLEEP simulates a stalled server in tests/test_faults.py.
             "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_lib.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_redis(tmp_path, settings):
    """Point ragcache's cache alias at a private redis-server (started)."""
    server = PrivateRedis(tmp_path)
    server.start()
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "LOCATION": server.url,
                          "OPTIONS": {**caches["ragcache"].get("OPTIONS", {}), "SOCKET_TIMEOUT": server.TIMEOUT,
                                      "SOCKET_CONNECT_TIMEOUT": server.TIMEOUT}}
    settings.CACHES = caches
    store.reset_clients()
    registry.invalidate()
    yield server
    server.stop()
    store.reset_clients()


@pytest.fixture
def broken_database():
    """Point this process's database connection at nothing (a closed port, or a SQLite
    file in a directory that does not exist); restore it afterwards."""
    from django.db import connection

    saved = dict(connection.settings_dict)

    def breaks() -> None:
        connection.close()
        if connection.vendor == "sqlite":
            connection.settings_dict["NAME"] = "/nonexistent-ragcache-dir/db.sqlite3"
        else:
            connection.settings_dict["PORT"] = str(free_port())  # nothing listens there

    def restore() -> None:
        connection.close()
        connection.settings_dict.update(saved)

    breaks.restore = restore
    yield breaks
    restore()
