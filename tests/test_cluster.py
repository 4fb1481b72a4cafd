"""Redis Cluster specifics on a real local cluster (tests/cluster.py): a master failing under
traffic, the spread of keys and usage events over masters, the system checks of a
misconfigured cluster, and per-node reachability in health and /metrics.

The cache contract itself (hits, stores, single-flight, purge, aggregation...) runs on the
cluster in tests/test_contract.py."""
from __future__ import annotations

import asyncio
import signal
import statistics
import threading
import time
import traceback
from collections import Counter

import pytest
import redis.cluster
from prometheus_client import REGISTRY
from redis.crc import key_slot

from ragcache import astore, connection, keys, store
from ragcache.checks import check_settings
from ragcache.conf import get_config
from ragcache.keys import SHARDS, layout
from ragcache.services import cache_service

from .cluster import NODE_TIMEOUT_MS

MODEL = "gpt-4o-mini"


@pytest.fixture
def on_policy(policy_factory):
    return policy_factory("default", mode="on", enabled=True, scope="global", ttl_seconds=3600, rollout_percent=100)


def shard_of_question(question: str) -> int:
    digest = keys.content_digest(keys.normalize_messages(question), model=MODEL, params={}, context_version=None)
    return keys.shard_of(digest)


def slot_of_shard(prefix: str, shard: int) -> int:
    return key_slot(layout(prefix).bases[shard].encode())


# --- failover ---------------------------------------------------------------------------------

def fallback() -> str:
    return "the model's answer"


class Traffic:
    """Threads asking known questions (sync and async) and storing new ones, recording every
    outcome with its time, shard and latency; any exception a caller sees is kept."""

    def __init__(self, questions: list[str], victim_shards: set[int]) -> None:
        self.questions = questions
        self.victim_shards = victim_shards
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.calls: list[tuple[float, str, bool, str, float]] = []  # (time, api, victim, outcome, seconds)
        self.exceptions: list[BaseException] = []
        self.failed_stores = []
        self.threads = [threading.Thread(target=self._guard, args=(target,), daemon=True)
                        for target in (self._lookups, self._lookups, self._stores, self._async_lookups)]

    def _record(self, api: str, shard: int, outcome: str, started: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.calls.append((now, api, shard in self.victim_shards, outcome, now - started))

    def _guard(self, target) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
            with self.lock:
                self.exceptions.append(exc)

    def _lookups(self) -> None:
        i = 0
        while not self.stop.is_set():
            question = self.questions[i % len(self.questions)]
            i += 1
            started = time.monotonic()
            # no_store: a miss only calls; outcome "error" = Redis unavailable, "miss" = the script ran.
            result = cache_service.get_or_call(question, fallback, model=MODEL, no_store=True)
            self._record("lookup", shard_of_question(question), result.outcome, started)
            time.sleep(0.001)

    def _stores(self) -> None:
        i = 0
        while not self.stop.is_set():
            question = f"new question {i}"
            i += 1
            started = time.monotonic()
            stored = cache_service.cache_response(question, "a new answer", model=MODEL)
            if not stored:
                self.failed_stores.append((question, shard_of_question(question), time.monotonic()))
            self._record("store", shard_of_question(question), "stored" if stored else "not_stored", started)
            time.sleep(0.002)

    def _async_lookups(self) -> None:
        async def loop(offset: int) -> None:
            i = offset
            while not self.stop.is_set():
                question = self.questions[(i * 7) % len(self.questions)]
                i += 1
                started = time.monotonic()
                result = await cache_service.aget_or_call(question, fallback, model=MODEL, no_store=True)
                self._record("alookup", shard_of_question(question), result.outcome, started)
                await asyncio.sleep(0.001)

        async def together() -> None:  # concurrent coroutines on one event loop's client
            await asyncio.gather(*(loop(offset * 1000) for offset in range(4)))

        asyncio.run(together())

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def window(self, start: float, end: float, *, victim: bool, apis=("lookup", "alookup")) -> list[str]:
        """Outcomes of the calls that ended between start and end."""
        with self.lock:
            return [outcome for at, api, on_victim, outcome, _ in self.calls
                    if start <= at < end and on_victim == victim and api in apis]

    def begun_after(self, start: float, *, victim: bool, apis=("lookup", "alookup")) -> list[tuple]:
        """(api, began, ended, outcome) of the calls that began at or after start: a call begun
        during the outage may end, failed, after hits resumed."""
        with self.lock:
            return [(api, at - seconds, at, outcome) for at, api, on_victim, outcome, seconds in self.calls
                    if at - seconds >= start and on_victim == victim and api in apis]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_master_fails_under_traffic(stop, cluster_backend, on_policy, settings, ragcache_prefix, monkeypatch,
                                      client, request):
    """Stop one master (SIGKILL: a crash; SIGTERM: a clean shutdown) while threads look up,
    store and look up asynchronously. Callers never see an exception: lookups on its slots
    miss and stores there return False at once, every lookup on the other masters hits, and
    hits on its slots resume once its replica is promoted (the figures are printed)."""
    cluster = cluster_backend
    # Short timeouts, though not production's 0.1 s: on this 2-core machine the traffic threads,
    # six redis-servers and the failover itself starve a thread for over 0.1 s now and then,
    # and a timeout on a healthy master is not what this test is about. A killed master
    # refuses connections at once, so the figures do not depend on the timeout.
    caches = {**settings.CACHES}
    caches["ragcache"] = {**caches["ragcache"], "OPTIONS": {
        **caches["ragcache"]["OPTIONS"], "SOCKET_TIMEOUT": 0.5, "SOCKET_CONNECT_TIMEOUT": 0.5}}
    settings.CACHES = caches
    settings.RAGCACHE = {**settings.RAGCACHE, "STREAM_MAXLEN": 100_000_000}
    connection.reset()

    seed = cluster.nodes[0].port
    victim = next(port for port in cluster.slots() if port != seed)  # new clients still bootstrap from the seed
    victim_shards = {s for s in range(SHARDS) if cluster.master_of_slot(slot_of_shard(ragcache_prefix, s)) == victim}
    questions = [f"known question {i}" for i in range(300)]
    for question in questions:
        assert cache_service.cache_response(question, f"answer to {question}", model=MODEL)
    on_victim = [q for q in questions if shard_of_question(q) in victim_shards]
    assert 0 < len(on_victim) < len(questions)

    healthy_failures = []  # why a call on a healthy master's shard failed, for the assertion messages
    victim_failures = []  # (when, exception) of each failure on the failed master's shards
    real_guarded, real_aguarded = store.guarded, astore.guarded

    def note(shard, exc) -> None:
        if shard is not None and shard not in victim_shards:
            healthy_failures.append((shard, repr(exc), repr(exc.__cause__)))
        elif shard is not None:
            victim_failures.append((time.monotonic(), exc))

    def guarded(fn, *args, shard=None, **kwargs):
        try:
            return real_guarded(fn, *args, shard=shard, **kwargs)
        except store.RedisUnavailable as exc:
            note(shard, exc)
            raise

    async def aguarded(fn, *args, shard=None):
        try:
            return await real_aguarded(fn, *args, shard=shard)
        except store.RedisUnavailable as exc:
            note(shard, exc)
            raise

    monkeypatch.setattr(store, "guarded", guarded)
    monkeypatch.setattr(astore, "guarded", aguarded)
    kinds = ("timeout", "connection", "cluster", "response", "other")
    errors_before = {k: REGISTRY.get_sample_value("ragcache_redis_errors_total", {"kind": k}) or 0 for k in kinds}
    traffic = Traffic(questions, victim_shards)
    traffic.start()
    time.sleep(1.0)
    request.addfinalizer(cluster.repair)  # the stopped node rejoins as a replica, whatever happens
    cluster.node(victim).kill(stop)  # returns once the process has exited
    killed = time.monotonic()
    during = reachability(client)

    # Promotion: a live node reports the victim's slots served by another (its replica).
    promoted = resumed = None
    deadline = killed + 60
    while time.monotonic() < deadline and resumed is None:
        if promoted is None:
            slots = cluster.slots()
            if victim not in slots and len(slots) == 3:
                promoted = time.monotonic()
        recent = traffic.window(time.monotonic() - 0.3, time.monotonic(), victim=True)
        if promoted and recent and all(outcome == "hit" for outcome in recent):
            resumed = time.monotonic() - 0.3
        time.sleep(0.05)
    # A shard's breaker, opened by its last failure before the promotion, skips Redis for up to
    # BREAKER_COOLDOWN more: hits are judged on the calls begun once every breaker has cooled down.
    settled = (resumed or time.monotonic()) + float(get_config()["BREAKER_COOLDOWN"])
    time.sleep(max(0.0, settled + 0.5 - time.monotonic()))
    traffic.join()
    after = reachability(client)

    assert traffic.exceptions == [], "".join(traceback.format_exception(traffic.exceptions[0]))
    assert promoted is not None, "the replica was never promoted"
    assert resumed is not None, "hits on the failed master's slots never resumed"
    outage_others = traffic.window(killed, resumed, victim=False)
    outage_victim = traffic.window(killed, resumed, victim=True)
    after_victim = traffic.begun_after(settled, victim=True)
    # Between the resumption and then, a failure may only be a breaker still cooling down:
    # nothing that reached Redis failed.
    late = [(round(at - killed, 3), repr(exc), repr(exc.__cause__)) for at, exc in victim_failures
            if at >= resumed and not isinstance(exc, connection.BreakerOpen)]
    assert not late, late[:5]
    # Hits on the other masters continue, every one of them, while the victim's slots miss.
    failed_others = [(api, round(at - killed, 3)) for at, api, on_victim_shard, outcome, _ in traffic.calls
                     if not on_victim_shard and outcome in ("error", "not_stored")]
    errors = {k: (REGISTRY.get_sample_value("ragcache_redis_errors_total", {"kind": k}) or 0) - errors_before[k]
              for k in kinds}
    causes = [failure for failure in healthy_failures if "BreakerOpen" not in failure[1]]
    assert outage_others and set(outage_others) == {"hit"} and not failed_others, (failed_others[:5], causes[:5])
    assert "error" in outage_victim
    assert after_victim and {outcome for *_, outcome in after_victim} == {"hit"}, [
        (api, round(began - killed, 3), round(ended - killed, 3), outcome)
        for api, began, ended, outcome in after_victim if outcome != "hit"][:10]
    # Stores begun and ended in the first second after the kill: surely before the promotion
    # (which cannot start before the node timeout), whenever the poll above noticed it. Begun
    # after it: a store the master answered just before dying may be recorded a little later.
    stores = Counter((on_victim_shard, outcome) for at, api, on_victim_shard, outcome, seconds in traffic.calls
                     if api == "store" and killed <= at - seconds and at < killed + NODE_TIMEOUT_MS / 1000)
    # Once in about 40 runs one store on a healthy master returned False with no Redis failure
    # recorded (unexplained; see the closing note of issue 11): tolerated once, shown, never more.
    if stores[(False, "not_stored")]:
        print(f"\nstores on healthy masters not stored: {traffic.failed_stores}; causes: {healthy_failures}")
    assert stores[(False, "stored")] > 0 and stores[(False, "not_stored")] <= 1, (healthy_failures, [
        (api, round(at - killed, 3)) for at, api, on_victim_shard, outcome, _ in traffic.calls
        if api == "store" and not on_victim_shard and outcome == "not_stored"], traffic.failed_stores)
    assert stores[(True, "not_stored")] > 0 and stores[(True, "stored")] == 0
    # Health and /metrics see a partial outage as one: Redis answers, one master does not;
    # after the promotion, three masters answer again.
    assert during == (True, {"up": 2, "down": 1}, True, {
        "ragcache_redis_up": 1.0, "ragcache_redis_masters_up": 2.0, "ragcache_redis_masters_down": 1.0}), during
    assert after == (True, {"up": 3, "down": 0}, False, {
        "ragcache_redis_up": 1.0, "ragcache_redis_masters_up": 3.0, "ragcache_redis_masters_down": 0.0}), after
    slowest = max(seconds for *_, seconds in traffic.calls)
    assert slowest < 5.0, f"a caller waited {slowest:.2f} s"

    # Usage events lost: written on the victim's shards (the caller saw its script run: a
    # hit, a miss or a store) but absent from the promoted replica's streams afterwards.
    written = len(on_victim) + sum(1 for _, api, on_victim_shard, outcome, _ in traffic.calls
                                   if on_victim_shard and outcome in ("hit", "miss", "stored"))
    raw = redis.cluster.RedisCluster.from_url(cluster.url)
    try:
        pipe = raw.pipeline(transaction=False)
        for shard in sorted(victim_shards):
            pipe.xlen(layout(ragcache_prefix).streams[shard])
        kept = sum(pipe.execute())
    finally:
        raw.close()
    victim_latency = sorted(seconds for at, api, on_victim_shard, _, seconds in traffic.calls
                            if on_victim_shard and api == "lookup" and killed <= at < resumed)
    print(f"\nfailover ({stop.name}, cluster-node-timeout {NODE_TIMEOUT_MS} ms): replica promoted after "
          f"{promoted - killed:.2f} s, hits on the failed slots resumed after {resumed - killed:.2f} s; "
          f"outage: {len(outage_others)} lookups on the other masters, all hits; on the failed master's slots "
          f"{dict(Counter(outage_victim))}; stores {dict(stores)}; usage events lost {written - kept} of "
          f"{written} written on the failed master's shards; slowest call {slowest * 1000:.0f} ms; lookups on "
          f"the failed slots during the outage: median {statistics.median(victim_latency) * 1000:.2f} ms, "
          f"max {victim_latency[-1] * 1000:.1f} ms; Redis errors by kind {errors}")


def reachability(client) -> tuple[bool, dict[str, int], bool, dict[str, float]]:
    """What /ragcache/health and /metrics say about Redis: (redis ok, masters up and down,
    "redis_masters_down" among the problems, the scrape's redis gauges)."""
    from prometheus_client.parser import text_string_to_metric_families

    health = client.get("/ragcache/health").json()
    gauges = {sample.name: sample.value for family in text_string_to_metric_families(
        client.get("/metrics").content.decode()) for sample in family.samples
        if sample.name in ("ragcache_redis_up", "ragcache_redis_masters_up", "ragcache_redis_masters_down")}
    return (health["redis"]["ok"], health["redis"].get("masters"), "redis_masters_down" in health["problems"],
            gauges)


# --- scripts on a master that has none ---------------------------------------------------------

def test_masters_without_scripts_still_serve(cluster_backend, on_policy):
    """A promoted replica or a restarted master has an empty script cache: EVALSHA answers
    NOSCRIPT, and ragcache runs the script with EVAL on that master (single calls and
    fan-outs, sync and async) instead of failing or loading it on every master."""
    from asgiref.sync import async_to_sync

    assert cache_service.cache_response("scripted", "an answer", model=MODEL, sources=["doc:1"])

    def flush() -> None:
        for node in cluster_backend.masters():
            client = node.client()
            try:
                client.script_flush()
            finally:
                client.close()

    flush()
    assert cache_service.get_cached_response("scripted", model=MODEL) is not None
    flush()
    assert cache_service.invalidate_sources(["doc:1"]) == 1  # a fan-out over all 256 shards
    assert cache_service.get_cached_response("scripted", model=MODEL) is None
    flush()

    async def asynchronous():
        stored = await cache_service.acache_response("scripted async", "an answer", model=MODEL)
        flush()
        found = await cache_service.aget_cached_response("scripted async", model=MODEL)
        flush()
        return stored, found, await cache_service.ainvalidate_sources(["doc:2"])

    stored, found, invalidated = async_to_sync(asynchronous)()
    assert stored and found is not None and invalidated == 1


# --- spread ------------------------------------------------------------------------------------

def count_per_master(cluster, prefix: str) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Per master port: entries, usage events, and usage events per shard stream."""
    root = layout(prefix).root
    entries, events, per_stream = {}, {}, {}
    for node in cluster.masters():
        client = node.client(timeout=10)
        try:
            entries[node.port] = sum(1 for _ in client.scan_iter(match=layout(prefix).entry_pattern(), count=5000))
            streams = list(client.scan_iter(match=f"{root}:{{*}}:u", count=5000))
            lengths = [client.xlen(stream) for stream in streams]
        finally:
            client.close()
        events[node.port] = sum(lengths)
        per_stream.update(zip(streams, lengths, strict=True))
    return entries, events, per_stream


@pytest.mark.slow
def test_keys_and_usage_events_spread_evenly_over_masters(cluster_backend, on_policy, ragcache_prefix):
    cluster = cluster_backend
    n = 10_000
    for i in range(n):  # each store writes one entry and one usage event ("store")
        assert cache_service.cache_response(f"distinct question number {i}", "an answer", model=MODEL)
    entries, events, _ = count_per_master(cluster, ragcache_prefix)
    entry_share = {port: count / n for port, count in entries.items()}
    event_share = {port: count / n for port, count in events.items()}

    # Then one question gets hot: 3,000 hits, each with its usage event.
    hot = "the one question everybody asks"
    assert cache_service.cache_response(hot, "the hot answer", model=MODEL)
    for _ in range(3_000):
        assert cache_service.get_cached_response(hot, model=MODEL) is not None
    _, _, per_stream = count_per_master(cluster, ragcache_prefix)
    hot_stream = layout(ragcache_prefix).streams[shard_of_question(hot)].encode()
    others = sorted(count for stream, count in per_stream.items() if stream != hot_stream)
    unrelated_on_hot = per_stream[hot_stream] - 3_001

    print(f"\nspread of {n} distinct questions over {len(entries)} masters (ports): entries "
          f"{ {p: f'{s:.1%}' for p, s in sorted(entry_share.items())} }, usage events "
          f"{ {p: f'{s:.1%}' for p, s in sorted(event_share.items())} }; per shard stream min/median/max "
          f"{others[0]}/{others[len(others) // 2]}/{others[-1]} events, the hot question's shard "
          f"{unrelated_on_hot} unrelated + 3001 of its own")

    assert len(entries) == 3 and sum(entries.values()) == n and sum(events.values()) == n
    for share in (*entry_share.values(), *event_share.values()):
        assert abs(share - 1 / 3) <= 0.15 / 3, (entry_share, event_share)
    # Heat stays with the hot question: its shard holds a usual share of unrelated events
    # (the shard comes from each question's own digest), and no other shard grew.
    assert len(per_stream) == SHARDS
    assert others[0] <= unrelated_on_hot <= others[-1]
    assert others[-1] < 3 * n / SHARDS


def test_shard_tags_map_shards_to_equal_slot_ranges():
    width = 16384 // SHARDS
    slots = [key_slot(f"x:{{{tag}}}:y".encode()) for tag in keys.shard_tags()]
    assert [slot // width for slot in slots] == list(range(SHARDS))
    assert len(set(keys.shard_tags())) == SHARDS


# --- system checks --------------------------------------------------------------------------------

def check_ids(settings_module, url) -> dict[str, str]:
    settings_module.RAGCACHE = {**settings_module.RAGCACHE, "REDIS_CLUSTER_URL": url}
    return {message.id: f"{message.msg} | {message.hint}" for message in check_settings()}


def test_checks_accept_a_healthy_cluster(redis_cluster, settings):
    found = check_ids(settings, redis_cluster.url)
    assert not [i for i in found if i in ("ragcache.E008", "ragcache.E009", "ragcache.W004", "ragcache.W005")]
    settings.CACHES = {"default": settings.CACHES["default"]}  # no ragcache alias: fine on a cluster
    assert "ragcache.E001" not in check_ids(settings, redis_cluster.url)


def test_checks_name_a_misconfigured_cluster(redis_cluster, settings):
    from .conftest import free_port

    for bad in ("127.0.0.1:7000", 7000, "http://127.0.0.1:7000", "redis://127.0.0.1:7000/2", "redis://:7000"):
        found = check_ids(settings, bad)
        assert "ragcache.E008" in found and "REDIS_CLUSTER_URL" in found["ragcache.E008"], bad

    unreachable = check_ids(settings, f"redis://127.0.0.1:{free_port()}")
    assert "ragcache.W004" in unreachable and "REDIS_CLUSTER_URL" in unreachable["ragcache.W004"]

    from .conftest import REDIS_URL

    standalone = check_ids(settings, REDIS_URL.rsplit("/", 1)[0])  # a server without cluster mode
    assert "ragcache.E009" in standalone and "not in cluster mode" in standalone["ragcache.E009"]


def test_checks_warn_when_slots_are_not_all_covered(redis_cluster, settings):
    """A cluster whose slots are not all served: take one slot away from its master, run the
    check, and give it back."""
    owner = redis_cluster.node(redis_cluster.master_of_slot(0))
    admin = owner.client()
    try:
        admin.execute_command("CLUSTER", "DELSLOTS", 0)
        found = check_ids(settings, f"redis://127.0.0.1:{owner.port}")
    finally:
        admin.execute_command("CLUSTER", "ADDSLOTS", 0)
        admin.close()
    redis_cluster.wait_healthy()
    assert "ragcache.W005" in found and "16383 of 16384" in found["ragcache.W005"], found
    assert "REDIS_CLUSTER_URL" in found["ragcache.W005"]


def test_several_seed_nodes_let_a_process_start_while_one_is_down(cluster_backend, on_policy, settings):
    """RAGCACHE['REDIS_CLUSTER_URL'] takes several seeds: a new process whose first seed is down
    (a dead node, a deploy during a failover) still maps the cluster from the next one."""
    from .conftest import free_port

    assert cache_service.cache_response("seeded", "an answer", model=MODEL)
    dead = f"redis://127.0.0.1:{free_port()}"
    for value in (f"{dead},{cluster_backend.url}", [dead, cluster_backend.url]):
        settings.RAGCACHE = {**settings.RAGCACHE, "REDIS_CLUSTER_URL": value}
        connection.reset()  # a fresh process
        assert connection.cluster_urls() == [dead, cluster_backend.url]
        assert cache_service.get_or_call("seeded", lambda: "called", model=MODEL).hit
        assert asyncio.run(cache_service.aget_cached_response("seeded", model=MODEL)) is not None
        assert not [m for m in check_settings() if m.id in ("ragcache.E008", "ragcache.W004")]
    settings.RAGCACHE = {**settings.RAGCACHE, "REDIS_CLUSTER_URL": f"{dead},{dead}"}
    (warning,) = [m for m in check_settings() if m.id == "ragcache.W004"]
    assert warning.msg.count("127.0.0.1") == 2  # names every seed it tried
