"""Set-up shared by the bench scripts: Django under a key prefix of its own, cleanup,
machine facts, and percentiles. Imported before Django is configured."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def prepare_env(prefix: str | None = None) -> str:
    """Environment for project.settings, set before django.setup(): a unique key prefix
    (the bench never touches anybody else's keys), DEBUG off as in production, and a
    bench-only SQLite database unless DATABASE_URL says otherwise (a hit runs no SQL,
    so the database only matters for loading the policy snapshot)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    prefix = prefix or os.environ.get("BENCH_PREFIX") or f"ragbench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.environ["RAGCACHE_KEY_PREFIX"] = prefix
    os.environ["BENCH_PREFIX"] = prefix
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("DEBUG", "0")
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


def cleanup(prefix: str) -> int:
    """SCAN + UNLINK this run's keys (ragcache's, and django-redis's ``:1:`` versioned
    ones). Never FLUSHDB: the Redis may be shared."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
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


def machine_facts() -> dict:
    import redis

    facts = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "redis_py": redis.__version__,
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            facts["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        client = redis.Redis.from_url(REDIS_URL)
        facts["redis_server"] = client.info("server").get("redis_version")
        client.close()
    except redis.RedisError:
        pass
    try:
        import hiredis  # noqa: F401

        facts["parser"] = "hiredis"
    except ImportError:
        facts["parser"] = "python"
    return facts


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(samples_ns: list[int]) -> dict:
    values = sorted(samples_ns)
    return {
        "n": len(values),
        "median_us": round(statistics.median(values) / 1000, 2) if values else None,
        "p99_us": round(percentile(values, 0.99) / 1000, 2) if values else None,
        "mean_us": round(sum(values) / len(values) / 1000, 2) if values else None,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
