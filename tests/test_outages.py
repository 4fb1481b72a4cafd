"""Each outage the alert rules know, reproduced with private servers and scraped for real.

A /metrics scrape is served by a fresh process in multiprocess mode, as gunicorn would
serve it, with the traffic and aggregation runs of other processes in the shared
directory. Per outage the scrape must say what broke and nothing else: the state ragcache
could not read has no sample, the dependencies that still answer say so.

docs/prometheus-alerts.test.yml holds, per outage, series recorded by a real Prometheus
during the same outage (scripts/outage_drill.py). The last test here checks that those
series have the shape these scrapes have: which gauges are present, their up/down values,
which counters move. So the promtool tests run the rules on what ragcache really exports.
"""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis as redis_lib
import yaml

from ragcache import metrics
from tests.conftest import PrivateRedis, free_port
from tests.test_multiprocess_metrics import ROOT, environment, parse, run_python

DOCS = ROOT / "docs"
# The outage, the alert that must name it, and the counters that must move while it lasts.
OUTAGES = {
    "redis_down": ("RagcacheRedisDown", []),
    "redis_full": ("RagcacheRedisRefusingWrites", [("ragcache_usage_events_lost_total", {"reason": "redis_full"})]),
    "database_down": ("RagcacheDatabaseDown", []),
    "broker_down": ("RagcacheBrokerDown", []),
    "aggregation_failing": ("RagcacheAggregationFailing", [("ragcache_aggregation_runs_total", {"result": "error"})]),
}

TRAFFIC = """
import django
django.setup()
from ragcache.services import cache_service
answer = {"content": "forty-two", "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
for n in range(6):
    cache_service.get_or_call(f"question {n % 3}", lambda: answer, model="gpt-x")
"""
AGGREGATE = """
import django
django.setup()
from ragcache.aggregation import aggregate
try:
    aggregate()
except Exception as exc:
    print(type(exc).__name__)
else:
    print("ok")
"""
# Metrics and health from one process that loaded its policies while the database
# answered, then lost the database (the file replaced by a directory: it cannot be opened).
SCRAPE_AFTER_DB_LOSS = """
import json, os, shutil
import django
django.setup()
from django.db import connections
from django.test import Client
client = Client()
assert client.get("/ragcache/health").status_code == 200
path = connections["default"].settings_dict["NAME"]
connections.close_all()
os.replace(path, path + ".away")
os.mkdir(path)
metrics = client.get("/metrics")
health = client.get("/ragcache/health")
os.rmdir(path)
os.replace(path + ".away", path)
print(json.dumps({"metrics": metrics.content.decode(), "health_status": health.status_code,
                  "health": health.json()}))
"""
SCRAPE_BOTH = """
import json
import django
django.setup()
from django.test import Client
client = Client()
metrics = client.get("/metrics")
health = client.get("/ragcache/health")
print(json.dumps({"metrics": metrics.content.decode(), "health_status": health.status_code,
                  "health": health.json()}))
"""


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """A migrated SQLite file, copied by each test (migrating once is the slow part)."""
    path = tmp_path_factory.mktemp("outage-db") / "template.sqlite3"
    env = {**environment(path.parent / "unused", "unused"), "DATABASE_URL": f"sqlite:///{path}"}
    env.pop("PROMETHEUS_MULTIPROC_DIR")
    env.pop("DATABASE_TEST_NAME", None)
    done = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return path


class Outage:
    """Private servers and the environment of the processes that use them."""

    def __init__(self, tmp_path: Path, prefix: str, template: Path, broker: str = "private") -> None:
        self.tmp_path = tmp_path
        (tmp_path / "redis").mkdir()
        self.redis = PrivateRedis(tmp_path / "redis")
        self.broker = None
        try:
            self._start(prefix, template, broker)
        except BaseException:
            self.close()  # no server outlives a failed set-up
            raise

    def _start(self, prefix: str, template: Path, broker: str) -> None:
        tmp_path = self.tmp_path
        self.redis.start()
        if broker == "private":
            (tmp_path / "broker").mkdir()
            self.broker = PrivateRedis(tmp_path / "broker")
            self.broker.start()
            broker_url = self.broker.url
        elif broker == "same":
            broker_url = self.redis.url.replace("/0", "/1")
        else:
            broker_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        self.db = tmp_path / "ragcache.sqlite3"
        shutil.copy(template, self.db)
        mp_dir = tmp_path / "prom"
        mp_dir.mkdir()
        self.env = environment(mp_dir, prefix, REDIS_URL=self.redis.url, CELERY_BROKER_URL=broker_url,
                               DATABASE_URL=f"sqlite:///{self.db}", RAGCACHE_LOG_LEVEL="ERROR")
        self.env.pop("DATABASE_TEST_NAME", None)

    def run(self, code: str) -> str:
        return run_python(code, self.env)

    def scrape(self, code: str = SCRAPE_BOTH) -> tuple[dict, int, dict, str]:
        """(samples, health status, health body, raw /metrics text) from a fresh process."""
        out = json.loads(self.run(code).strip().splitlines()[-1])
        return parse(out["metrics"]), out["health_status"], out["health"], out["metrics"]

    def close(self) -> None:
        self.redis.stop()
        if self.broker:
            self.broker.stop()


@pytest.fixture
def outage_env(tmp_path, ragcache_prefix, migrated_db):
    made = []

    def make(broker: str = "private") -> Outage:
        made.append(Outage(tmp_path, ragcache_prefix, migrated_db, broker))
        return made[-1]

    yield make
    for outage in made:
        outage.close()


def gauges(samples: dict) -> dict[str, float]:
    return {name: v for (name, labels), v in samples.items() if name in metrics.SCRAPE_GAUGES and not labels}


def counter(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def assert_no_unknown_as_number(text: str, absent: set[str]) -> None:
    for name in absent:
        assert not re.search(rf"^{name}[ {{]", text, re.M), f"{name} has a sample although it is unknown"


HEALTHY = {"ragcache_redis_up": 1, "ragcache_database_up": 1, "ragcache_broker_up": 1,
           "ragcache_redis_masters_full": 0}


@pytest.mark.slow
def test_redis_down(outage_env):
    outage = outage_env()
    outage.run(TRAFFIC)
    assert outage.run(AGGREGATE).strip() == "ok"
    outage.run(TRAFFIC)
    before, *_ = outage.scrape()
    assert gauges(before).items() >= HEALTHY.items()
    assert gauges(before)["ragcache_usage_backlog"] == 6  # the second round's six hits
    assert gauges(before)["ragcache_last_aggregation_timestamp_seconds"] > 1.7e9

    outage.redis.stop()
    during, status, health, text = outage.scrape()
    assert gauges(during) == {"ragcache_redis_up": 0, "ragcache_database_up": 1, "ragcache_broker_up": 1}
    assert_no_unknown_as_number(text, set(metrics.SCRAPE_GAUGES) - set(gauges(during)))
    assert status == 503 and health["status"] == "unavailable" and health["problems"] == ["redis_unreachable"]
    assert health["database"] == {"ok": True} and health["broker"] == {"ok": True}
    assert "last_aggregation" not in health and "usage_backlog" not in health


@pytest.mark.slow
def test_redis_down_with_the_broker_on_the_same_server(outage_env):
    """The demo's layout: the broker is another database of the same Redis. Both are down,
    and both are said (the BrokerDown rule defers to RedisDown for the same instance)."""
    outage = outage_env(broker="same")
    outage.redis.stop()
    during, status, health, _ = outage.scrape()
    assert gauges(during) == {"ragcache_redis_up": 0, "ragcache_database_up": 1, "ragcache_broker_up": 0}
    assert health["problems"] == ["redis_unreachable", "broker_unreachable"]


@pytest.mark.slow
def test_redis_full(outage_env):
    outage = outage_env()
    outage.run(TRAFFIC)
    before, *_ = outage.scrape()
    server = redis_lib.Redis(port=outage.redis.port)
    server.config_set("maxmemory-policy", "noeviction")
    server.config_set("maxmemory", 1)
    try:
        outage.run(TRAFFIC.replace("question {n % 3}", "question {n}"))  # three hits, three misses
        assert outage.run(AGGREGATE).strip() == "RedisCommandError"  # it cannot even take its lock
        during, status, health, _ = outage.scrape()
    finally:
        server.config_set("maxmemory", 0)
        server.close()
    assert gauges(during).items() >= {**HEALTHY, "ragcache_redis_masters_full": 1}.items()
    assert gauges(during)["ragcache_usage_backlog"] == 9  # reads work: the events of the first round wait
    lost = counter(during, "ragcache_usage_events_lost_total", reason="redis_full")
    assert lost - counter(before, "ragcache_usage_events_lost_total", reason="redis_full") >= 6
    assert counter(during, "ragcache_refusals_total", policy="default", reason="redis_full") == 3
    assert status == 200 and health["status"] == "degraded" and health["problems"] == ["redis_refusing_writes"]


@pytest.mark.slow
def test_database_down(outage_env):
    outage = outage_env()
    outage.run(TRAFFIC)
    during, status, health, _ = outage.scrape(SCRAPE_AFTER_DB_LOSS)
    assert gauges(during).items() >= {**HEALTHY, "ragcache_database_up": 0}.items()
    assert gauges(during)["ragcache_usage_backlog"] == 9  # 3 misses, 3 stores, 3 hits
    assert status == 200 and health["status"] == "degraded" and health["problems"] == ["database_unreachable"]
    assert health["database"] == {"ok": False, "error": "OperationalError"}
    assert health["policies_loaded"] == ["default"]  # the snapshot loaded before the loss still serves


@pytest.mark.slow
def test_database_unreachable_from_the_start_bypasses_the_cache(outage_env):
    outage = outage_env()
    outage.db.unlink()
    outage.db.mkdir()  # SQLite cannot open a directory
    during, status, health, _ = outage.scrape()
    assert gauges(during)["ragcache_database_up"] == 0 and gauges(during)["ragcache_redis_up"] == 1
    assert status == 503 and health["problems"] == ["database_unreachable", "policies_unavailable"]


@pytest.mark.slow
def test_broker_down(outage_env):
    outage = outage_env(broker="dead")
    outage.run(TRAFFIC)
    during, status, health, _ = outage.scrape()
    assert gauges(during).items() >= {**HEALTHY, "ragcache_broker_up": 0}.items()
    assert gauges(during)["ragcache_usage_lag_seconds"] >= 0
    assert status == 200 and health["problems"] == ["broker_unreachable"]
    assert health["broker"] == {"ok": False, "error": "OperationalError"}


@pytest.mark.slow
def test_aggregation_failing(outage_env):
    """A migration not applied (here: the records table renamed away): runs fail while
    Redis and the database answer; reads of ragcache's flags still work."""
    outage = outage_env()
    outage.run(TRAFFIC)
    with sqlite3.connect(outage.db) as db:
        db.execute("ALTER TABLE ragcache_usagerecord RENAME TO ragcache_usagerecord_away")
    assert outage.run(AGGREGATE).strip() == "OperationalError"
    assert outage.run(AGGREGATE).strip() == "OperationalError"
    during, status, health, _ = outage.scrape()
    assert gauges(during).items() >= HEALTHY.items()
    assert counter(during, "ragcache_aggregation_runs_total", result="error") == 2
    assert counter(during, "ragcache_aggregation_runs_total", result="ok") == 0
    assert gauges(during)["ragcache_usage_backlog"] == 9  # nothing was acknowledged
    assert "ragcache_last_aggregation_timestamp_seconds" not in gauges(during)
    assert status == 200 and health["status"] == "ok"  # health sees no outage: the rule does


def _expand(values: str) -> list[float | None]:
    """promtool's expanding notation (``stale`` and ``_`` are both "no sample" here)."""
    out: list[float | None] = []
    for token in values.split():
        if token in ("_", "stale"):
            out.append(None)
        elif m := re.fullmatch(r"_x(\d+)", token):
            out.extend([None] * int(m[1]))
        elif m := re.fullmatch(r"(-?[\d.e+]+?)([+-])([\d.e+]+)x(\d+)", token):
            start, step = float(m[1]), float(m[3]) * (1 if m[2] == "+" else -1)
            out.extend(start + i * step for i in range(int(m[4]) + 1))
        else:
            out.append(float(token))
    return out


def _selector(series: str) -> tuple[str, dict[str, str]]:
    name, _, rest = series.partition("{")
    return name, dict(re.findall(r'(\w+)="([^"]*)"', rest))


def test_promtool_outage_series_have_the_shape_of_real_scrapes():
    """docs/prometheus-alerts.test.yml, per outage: the recorded series agree with what the
    scrapes above export (present/absent gauges, up/down values, the counters that move),
    and the rule test expects exactly the outage's own alert, every other rule silent."""
    tests = yaml.safe_load((DOCS / "prometheus-alerts.test.yml").read_text())["tests"]
    groups = {m[1]: g for g in tests if (m := re.match(r"outage: (\w+) ", g.get("name", "")))}
    assert set(OUTAGES) <= set(groups)
    all_alerts = {r["alert"] for g in yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())["groups"]
                  for r in g["rules"]}
    expected_gauges = {
        "redis_down": {"ragcache_redis_up": 0, "ragcache_database_up": 1, "ragcache_broker_up": 1},
        "redis_full": {**HEALTHY, "ragcache_redis_masters_full": 1},
        "database_down": {**HEALTHY, "ragcache_database_up": 0},
        "broker_down": {**HEALTHY, "ragcache_broker_up": 0},
        "aggregation_failing": HEALTHY,
    }
    for outage, (alert, moving) in OUTAGES.items():
        group = groups[outage]
        broken, repaired = (int(x) for x in re.search(r"broken at (\d+)s, repaired at (\d+)s", group["name"]).groups())
        interval = int(group["interval"].rstrip("s"))
        series = {}
        for item in group["input_series"]:
            name, labels = _selector(item["series"])
            labels.pop("instance", None)
            labels.pop("job", None)
            series[(name, frozenset(labels.items()))] = _expand(item["values"])
        last = repaired // interval - 1  # the last scrape before the repair
        first = broken // interval - 1  # the last scrape before the outage
        for name in metrics.SCRAPE_GAUGES:
            values = series.get((name, frozenset()), [])
            during = values[last] if last < len(values) else None
            if name in expected_gauges[outage]:
                assert during == expected_gauges[outage][name], (outage, name, during)
            elif name in ("ragcache_usage_backlog", "ragcache_usage_lag_seconds"):
                assert (during is None) == (outage == "redis_down"), (outage, name, during)
            elif name == "ragcache_redis_masters_full":
                assert during is None, (outage, name)
        for name, labels in moving:
            values = series[(name, frozenset(labels.items()))]
            assert values[last] > values[first], (outage, name, values[first], values[last])
        checks = [c for c in group["alert_rule_test"] if c["eval_time"] == f"{last * interval}s"]
        assert {c["alertname"] for c in checks} == all_alerts, outage  # every rule is asserted
        for check in checks:
            fired = {a["exp_labels"]["severity"] and check["alertname"] for a in check.get("exp_alerts") or []}
            assert fired == ({alert} if check["alertname"] == alert else set()), (outage, check["alertname"])
