"""Structured step log lines in the seed cards' shape.

    RAG STEP 68 (RAG.cache.cacheservice.cache.response.store.in.redis): CacheService.cache_response Store in Redis \
| attrs={...}

(one line; wrapped here).

``attrs`` is JSON. Each record also carries ``rag_step``, ``rag_step_id`` and
``rag_attrs`` as attributes; ``JsonStepFormatter`` emits them as fields (see
docs/observability.md for the LOGGING setting). Callers pass only hashes, counts and
names: never prompt or answer text.

Off the hot path: by default (``RAGCACHE["STEP_LOG_QUEUE"] = True``) a step line is
queued and a daemon thread builds the ``LogRecord`` and hands it to the ``ragcache.steps``
logger's handlers, in order, with the time, thread and process of the request that logged
it. Formatting and writing a line costs tens of microseconds (more than the rest of a
hit); the request pays a queue append. This is the pattern of the standard library's
``QueueHandler``, applied before the record exists. ``flush()`` waits until every queued
line is handled (it runs at interpreter exit too).
"""
from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from queue import SimpleQueue
from typing import Any

from .conf import get_config

logger = logging.getLogger("ragcache.steps")

STEPS: dict[int, tuple[str, str]] = {
    59: ("RAG.cache.cacheservice.get.cached.response.check.cache", "CacheService.get_cached_response Check cache"),
    60: ("RAG.cache.policyregistry.resolve.resolve.policy", "PolicyRegistry.resolve Resolve cache policy"),
    61: ("RAG.cache.keys.cache.key.generate.cache.key", "keys.cache_key Generate cache key"),
    62: ("RAG.cache.cache.hit", "Cache hit?"),
    63: ("RAG.cache.usagetracker.track.track.cache.hit", "UsageTracker.track Track cache hit"),
    68: ("RAG.cache.cacheservice.cache.response.store.in.redis", "CacheService.cache_response Store in Redis"),
}
_HEADS = {step: f"RAG STEP {step} ({step_id}): {label} | attrs=" for step, (step_id, label) in STEPS.items()}

# One encoder for every line: json.dumps() with options builds a new one per call.
_ATTRS_JSON = json.JSONEncoder(default=str)


def format_step(step: int, attrs: dict[str, Any]) -> str:
    return _HEADS[step] + _ATTRS_JSON.encode(attrs)


def _record(step: int, attrs: dict[str, Any], level: int, created: float, thread: int, thread_name: str,
            process: int) -> logging.LogRecord:
    record = logger.makeRecord(
        logger.name, level, __file__, _LOG_LINE, format_step(step, attrs), None, None, "log_step",
        {"rag_step": step, "rag_step_id": STEPS[step][0], "rag_attrs": attrs},
    )
    record.created = created
    record.msecs = (created - int(created)) * 1000
    record.thread, record.threadName, record.process = thread, thread_name, process
    return record


class _Writer:
    """The daemon thread that handles queued step lines (one per process, made after fork)."""

    def __init__(self) -> None:
        self.queue: SimpleQueue = SimpleQueue()
        self.queued = itertools.count(1)  # next() is atomic: no lock on the hot path
        self.last_queued = 0
        self.handled = 0
        threading.Thread(target=self._run, name="ragcache-steplog", daemon=True).start()

    def put(self, item: tuple) -> None:
        self.last_queued = next(self.queued)
        self.queue.put(item)

    def _run(self) -> None:
        while True:
            step, attrs, *rest = self.queue.get()
            try:
                logger.handle(_record(step, attrs() if callable(attrs) else attrs, *rest))
            except Exception:  # noqa: BLE001 - a broken handler must not stop the writer
                pass
            self.handled += 1

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.handled < self.last_queued:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True


_writer: _Writer | None = None
_writer_lock = threading.Lock()
_pid = os.getpid()


def _forked() -> None:
    # A forked child (gunicorn, Celery prefork) has no writer thread: it makes its own.
    global _writer, _pid, _writer_lock
    _writer, _pid, _writer_lock = None, os.getpid(), threading.Lock()


os.register_at_fork(after_in_child=_forked)


def _queue_enabled() -> bool:
    return bool(get_config()["STEP_LOG_QUEUE"])


def log_step(step: int, attrs: dict[str, Any] | Callable[[], dict[str, Any]], level: int = logging.INFO) -> None:
    """Log one step line. ``attrs`` may be a function returning them: with the queue on, it
    runs in the writer thread, so building the attributes costs the request nothing."""
    if not logger.isEnabledFor(level):
        return
    thread = threading.current_thread()
    item = (step, attrs, level, time.time(), thread.ident, thread.name, _pid)
    if _queue_enabled():
        global _writer
        writer = _writer
        if writer is None:  # the first line of this process (again after a fork)
            with _writer_lock:
                if _writer is None:
                    _writer = _Writer()
                writer = _writer
        writer.put(item)
    else:
        logger.handle(_record(step, attrs() if callable(attrs) else attrs, *item[2:]))


def flush(timeout: float = 5.0) -> bool:
    """Wait until every queued step line has been handled; False on timeout."""
    writer = _writer
    return writer is None or writer.flush(timeout)


atexit.register(flush, 2.0)

_LOG_LINE = log_step.__code__.co_firstlineno


class JsonStepFormatter(logging.Formatter):
    """One JSON object per line; step records add ``rag_step``, ``rag_step_id`` and
    ``rag_attrs`` as fields, so log pipelines can filter on them without parsing text."""

    STEP_FIELDS = ("rag_step", "rag_step_id", "rag_attrs")

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.STEP_FIELDS:
            if hasattr(record, name):
                data[name] = getattr(record, name)
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)
