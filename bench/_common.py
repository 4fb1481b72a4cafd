"""Set-up shared by the bench scripts: a private redis-server pinned to one CPU, the bench
pinned to the other, Django under a key prefix of its own with the demo project's logging
writing to /dev/null, machine facts (placement, load average, date), percentiles, tables
and the JSON file. Imported before Django is configured.

Why the pinning (docs/performance.md, "Method"): on a 2-vCPU machine a raw GET costs ~25 µs
when client and redis-server share a CPU and ~110 µs when they do not, and an unpinned run
swings between the two. Every figure here is taken with the placement printed beside it.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The question and answer every hot-path case uses (bench/hotpath.py, bench/async_hits.py).
MODEL = "gpt-4o-mini"
QUESTION = "How do I rotate the API keys of a production service without downtime? Keep it short."
STORE_QUESTION = "Which settings decide how long an answer stays in the cache?"
# The Redis of scripts that use an existing server (bench/aggregation.py); the hot-path
# bench starts a private one instead.
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


# --- machine facts ----------------------------------------------------------------------

def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def affinity(pid: int = 0) -> list[int]:
    """The CPUs ``pid`` (0: this process) may run on, as the kernel reports them."""
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def cpus_text(cpus: list[int]) -> str:
    if not cpus:
        return "?"
    if len(cpus) == (os.cpu_count() or 0):
        return "any"
    return ",".join(str(c) for c in cpus)


def pin_self(cpu: int | None) -> list[int]:
    """Pin this process (all its threads made from now on) to ``cpu``; None leaves it free."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return affinity()


def taskset(cpu: int | None) -> list[str]:
    """The command prefix that pins a child process to ``cpu`` (nothing when None)."""
    if cpu is None:
        return []
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin processes; or pass --no-pin")
    return ["taskset", "-c", str(cpu)]


class Placement:
    """Which CPU each process runs on, read back from the kernel (not what was asked)."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def remove(self, name: str) -> None:
        self.pids.pop(name, None)

    def snapshot(self, **extra: int) -> dict[str, str]:
        pids = {"bench": os.getpid(), **self.pids, **extra}
        return {name: cpus_text(affinity(pid)) for name, pid in pids.items()}

    @staticmethod
    def text(snapshot: dict[str, str]) -> str:
        return " ".join(f"{name}@cpu{cpus}" for name, cpus in snapshot.items())


def machine_facts() -> dict:
    import redis

    facts = {
        "date": now(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_py": redis.__version__,
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            facts["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import hiredis  # noqa: F401

        facts["parser"] = "hiredis"
    except ImportError:
        facts["parser"] = "python"
    return facts


# --- processes ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited during start-up (code {process.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def stop(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a child this bench started (by its own handle: never by name)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class RedisServer:
    """A private, throw-away redis-server on a free loopback port, pinned to ``cpu``: no
    persistence, its own temporary directory, stopped (SIGTERM to its pid) by ``stop()``.
    The shared Redis on 6379 is never touched by the bench."""

    def __init__(self, cpu: int | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ragcache-bench-redis-")
        cmd = [*taskset(cpu), binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
               "--logfile", os.path.join(self.dir, "redis.log")]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, "redis-server")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.version = self._version()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _version(self) -> str:
        import redis

        client = redis.Redis(port=self.port)
        try:
            return client.info("server").get("redis_version", "?")
        finally:
            client.close()

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Django -------------------------------------------------------------------------------

def prepare_env(redis_url: str | None = None, prefix: str | None = None, settings: str = "project.settings") -> str:
    """Environment for the project's settings, set before django.setup(): the private Redis,
    a unique key prefix, DEBUG off as in production, and a bench-only SQLite database
    unless DATABASE_URL says otherwise (a hit runs no SQL: the database only matters for
    loading the policy snapshot)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    prefix = prefix or os.environ.get("BENCH_PREFIX") or f"ragbench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.environ["REDIS_URL"] = redis_url or REDIS_URL
    os.environ["BENCH_PREFIX"] = prefix
    os.environ["RAGCACHE_KEY_PREFIX"] = prefix
    os.environ["DJANGO_SETTINGS_MODULE"] = settings
    os.environ["DEBUG"] = "0"
    os.environ["DEMO_LLM_DELAY_MS"] = "0"
    if not os.environ.get("DATABASE_URL"):
        RESULTS.mkdir(parents=True, exist_ok=True)
        os.environ["DATABASE_URL"] = f"sqlite:///{RESULTS / 'bench.sqlite3'}"
    return prefix


def setup_django(*, migrate: bool) -> None:
    import django

    django.setup()
    if migrate:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)


def cleanup(prefix: str, redis_url: str | None = None) -> int:
    """SCAN + UNLINK this run's keys (ragcache's, and django-redis's ``:1:`` versioned ones)
    on a Redis that may be shared. Never FLUSHDB."""
    import redis

    client = redis.Redis.from_url(redis_url or REDIS_URL)
    deleted = 0
    try:
        for pattern in (f"{prefix}:*", f":1:{prefix}:*"):
            batch = []
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += client.unlink(*batch)
                    batch = []
            if batch:
                deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted


def shipped_logging(project_logging: dict, steps_level: str | None = None) -> dict:
    """The demo project's LOGGING as shipped (formatter, levels: ragcache at INFO, so step
    lines are kept), with its console handler writing to /dev/null through a real
    StreamHandler: every line is formatted and written, which is what a user pays. A second
    handler shows WARNING and above on stderr so that Redis trouble is not hidden."""
    config = copy.deepcopy(project_logging)
    config["handlers"] = {
        "console": {"class": "logging.FileHandler", "filename": os.devnull, "formatter": "plain"},
        "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "level": "WARNING"},
    }
    config["loggers"]["ragcache"]["handlers"] = ["console", "stderr"]
    config["loggers"]["ragcache"]["level"] = "INFO"
    if steps_level:
        config["loggers"]["ragcache.steps"] = {"level": steps_level.upper()}
    return config


def configure_shipped_logging() -> None:
    import logging.config

    from django.conf import settings

    logging.config.dictConfig(shipped_logging(settings.LOGGING))


# --- statistics and output ------------------------------------------------------------------

def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(samples_ns: list[int]) -> dict:
    values = sorted(samples_ns)
    if not values:
        return {"n": 0, "median_us": None, "p90_us": None, "p99_us": None}
    return {
        "n": len(values),
        "median_us": round(statistics.median(values) / 1000, 2),
        "p90_us": round(percentile(values, 0.90) / 1000, 2),
        "p99_us": round(percentile(values, 0.99) / 1000, 2),
    }


def header(title: str, placement: str, load_before: list[float], load_after: list[float], started: str,
           notes: str = "") -> None:
    print(f"\n== {title}")
    print(f"   {started}; placement {placement}; load average {fmt_load(load_before)} before, "
          f"{fmt_load(load_after)} after")
    if notes:
        print(f"   {notes}")


def fmt_load(load: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def print_rows(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """``columns``: (key, heading, format spec); numbers (a spec) right-aligned, text left."""
    cells = [[heading for _, heading, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        text = "  ".join(c.rjust(widths[i]) if columns[i][2] else c.ljust(widths[i]) for i, c in enumerate(line))
        print("   " + text.rstrip())
        if n == 0:
            print("   " + "-" * len(text))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def git_head() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def make_answer(size: int = 2000) -> dict:
    """An OpenAI-style response whose content is ``size`` characters (~2.2 KB stored)."""
    sentence = "Rotate keys by issuing a new one, deploying it alongside the old, then revoking the old. "
    content = (sentence * (size // len(sentence) + 1))[:size]
    return {
        "id": "chatcmpl-bench",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 42, "completion_tokens": 420},
    }
