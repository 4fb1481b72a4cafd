"""Redis Cluster capacity on this machine: what a hit, a miss and a store cost one master,
and how many hits per second one master sustains (docs/scaling.md).

    .venv/bin/python bench/cluster.py [--seconds 8] [--clients 3] [--answer-bytes 2000]
                                      [--keys 2000] [--replica] [--no-pin]

Everything is private to the run: a one-master Redis Cluster (``redis-server
--cluster-enabled yes`` owning all 16384 slots, no persistence, pinned to CPU 1; with
``--replica`` a replica too, pinned to CPU 0 with the clients), ragcache pointed at it
through RAGCACHE["REDIS_CLUSTER_URL"], a key prefix and a SQLite database of its own. The
shared Redis on 6379 is never touched.

1. Costs: bytes per entry and per usage event (MEMORY USAGE), and the Redis commands of a
   hit, a miss and a store (INFO commandstats deltas: the commands run inside the scripts
   are counted too; round trips are the top-level EVALSHA calls).
2. End to end: --clients processes (pinned to CPU 0) calling
   ``cache_service.get_cached_response`` on stored questions for --seconds: hits/s, and the
   master's CPU seconds over the window (/proc), so hits per master CPU-second.
3. Server-bound: the same processes sending ragcache's own LOOKUP calls (taken from the flow,
   byte for byte) pipelined 100 at a time straight to the master: the hits/s one master
   sustains when its CPU is the limit.

Figures go to stdout and bench/results/cluster.json. On 2 vCPUs the clients share one CPU:
phase 2 is client-bound by design (Python per call), phase 3 is the master's ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common  # noqa: E402
from tests.cluster import cluster_info  # noqa: E402

MODEL = "gpt-4o-mini"
ANSWER = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x" * 1999}}],
          "usage": {"prompt_tokens": 900, "completion_tokens": 450}}
PIPELINE = 100
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the private cluster ------------------------------------------------------------------

class ClusterNode:
    def __init__(self, cpu: int | None, directory: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port, self.bus_port = _common.free_port(), _common.free_port()
        cmd = [*_common.taskset(cpu), binary, "--port", str(self.port), "--bind", "127.0.0.1",
               "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
               "--cluster-config-file", f"nodes-{self.port}.conf", "--cluster-node-timeout", "5000",
               "--repl-diskless-sync-delay", "0",
               "--save", "", "--appendonly", "no", "--dir", directory, "--daemonize", "no",
               "--loglevel", "warning", "--logfile", os.path.join(directory, f"redis-{self.port}.log")]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        _common.wait_for_port(self.port, self.process, "redis-server")

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=10)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def stop(self) -> None:
        _common.stop(self.process)


def wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_cluster(pin: bool, with_replica: bool, directory: str, started: list[ClusterNode]) -> None:
    """The master (and replica) are appended to ``started`` as soon as they run, so that the
    caller stops them whatever happens next."""
    master = ClusterNode(1 if pin else None, directory)
    started.append(master)
    admin = master.client()
    admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
    wait(lambda: cluster_info(master).get("cluster_state") == "ok", "the one-master cluster")
    replica = None
    if with_replica:
        replica = ClusterNode(0 if pin else None, directory)
        started.append(replica)
        meet = replica.client()
        meet.execute_command("CLUSTER", "MEET", "127.0.0.1", master.port, master.bus_port)
        meet.close()
        master_id = admin.execute_command("CLUSTER", "MYID")
        master_id = master_id.decode() if isinstance(master_id, bytes) else master_id

        def replicate() -> bool:
            client = replica.client()
            try:
                client.execute_command("CLUSTER", "REPLICATE", master_id)
                return True
            except Exception:  # noqa: BLE001 - the master is not known to the replica yet: try again
                return False
            finally:
                client.close()

        def in_sync() -> bool:
            client = replica.client()
            try:
                return client.info("replication").get("master_link_status") == "up"
            finally:
                client.close()

        wait(replicate, "the replica to know its master")
        wait(in_sync, "the replica's first sync")
    admin.close()


# --- client processes -------------------------------------------------------------------------

def questions(n: int) -> list[str]:
    return [f"benchmark question number {i}: what does the cluster sustain?" for i in range(n)]


def client_main(args) -> None:
    """One client process: run ``args.client`` until the deadline, print a JSON line."""
    _common.prepare_env()
    _common.setup_django(migrate=False)
    _common.configure_shipped_logging()
    from ragcache.policies import registry
    from ragcache.services import cache_service

    registry.current()
    asked = questions(args.keys)
    while time.time() < args.start_at:
        time.sleep(0.001)
    deadline = args.start_at + args.seconds
    ops = hits = 0
    if args.client == "e2e":
        while time.time() < deadline:
            for _ in range(50):
                found = cache_service.get_cached_response(asked[(ops * 7 + os.getpid()) % len(asked)], model=MODEL)
                ops += 1
                hits += found is not None
    else:
        import redis

        if args.client == "pipelined-store":
            calls = [store_call(q) for q in asked]
        elif args.client == "pipelined-miss":
            calls = [lookup_call(f"{q} (never stored)") for q in asked]
        else:
            calls = [lookup_call(q) for q in asked]
        client = redis.Redis(port=args.master_port, socket_timeout=30)
        i = 0
        while time.time() < deadline:
            pipe = client.pipeline(transaction=False)
            for _ in range(PIPELINE):
                script, keys, script_args = calls[i % len(calls)]
                i += 1
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *script_args)
            for reply in pipe.execute():
                ops += 1
                hits += reply[0] in (b"hit", b"stored")
        client.close()
    print(json.dumps({"ops": ops, "hits": hits}))


def lookup_call(question: str):
    """The LOOKUP script call ragcache makes for a plain get_cached_response of ``question``."""
    from ragcache import flows, plans

    request = plans.make_request(question, model=MODEL, policy="default", scope=None, params=None,
                                 context_version=None)
    return first_run(flows.get_cached_response(request))


def store_call(question: str):
    """The STORE script call ragcache makes for cache_response(``question``, a 2 KB answer)."""
    from ragcache import flows, plans

    request = plans.make_request(question, model=MODEL, policy="default", scope=None, params=None,
                                 context_version=None)
    return first_run(flows.cache_response(request, ANSWER, 1200.0))


def first_run(flow):
    from ragcache.effects import RELOAD, Run
    from ragcache.policies import registry

    effect = flow.send(None)
    while not isinstance(effect, Run):
        effect = flow.send(registry.reload() if effect is RELOAD else None)
    flow.close()
    return effect.script, effect.keys, effect.args


def run_clients(mode: str, args, master: ClusterNode, pin: bool) -> dict:
    start_at = time.time() + 3.0 + 1.0 * args.clients  # every client set up (Django, policies) before the clock
    procs = [subprocess.Popen(
        [*_common.taskset(0 if pin else None), sys.executable, __file__, "--client", mode, "--seconds",
         str(args.seconds), "--start-at", str(start_at), "--keys", str(args.keys), "--master-port",
         str(master.port)], stdout=subprocess.PIPE, env=os.environ.copy()) for _ in range(args.clients)]
    while time.time() < start_at:
        time.sleep(0.005)
    cpu_before = master.cpu_seconds()
    time.sleep(args.seconds)
    cpu_used = master.cpu_seconds() - cpu_before
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.seconds + 60)
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    hits = sum(r["hits"] for r in results)
    ops = sum(r["ops"] for r in results)
    return {"mode": mode, "clients": args.clients, "seconds": args.seconds, "ops": ops, "hits": hits,
            "ops_per_s": round(ops / args.seconds), "master_cpu_s": round(cpu_used, 2),
            "master_cpu_pct": round(100 * cpu_used / args.seconds, 1),
            "ops_per_master_cpu_s": round(ops / cpu_used) if cpu_used else None,
            "master_cpu_us_per_op": round(1e6 * cpu_used / ops, 1) if ops else None}


# --- costs ----------------------------------------------------------------------------------

def commandstats(master: ClusterNode) -> dict[str, int]:
    client = master.client()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()
            if name not in ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_hello")}  # the bench's own


def commands_of(master: ClusterNode, operation) -> dict[str, int]:
    client = master.client()
    client.config_resetstat()
    client.close()
    operation()
    return {name: calls for name, calls in sorted(commandstats(master).items()) if calls}


def costs(master: ClusterNode, args, prefix: str) -> dict:
    from ragcache.keys import layout
    from ragcache.services import cache_service

    answer = {**ANSWER, "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "x" * args.answer_bytes}}]}
    asked = questions(args.keys)
    client = master.client()
    used_before = int(client.info("memory")["used_memory"])
    for question in asked:
        assert cache_service.cache_response(question, answer, model=MODEL, latency_ms=1200.0)
    used_after = int(client.info("memory")["used_memory"])
    entry_keys = list(client.scan_iter(match=layout(prefix).entry_pattern(), count=1000))[:500]
    entry_bytes = sum(client.memory_usage(k, samples=0) for k in entry_keys) / len(entry_keys)
    client.close()

    new = iter(range(10**9))
    operations = {
        "hit (get_cached_response)": lambda: cache_service.get_cached_response(asked[0], model=MODEL),
        "miss, then call and store (get_or_call)": lambda: cache_service.get_or_call(
            f"never asked {next(new)}", lambda: answer, model=MODEL),
        "miss only (get_cached_response)": lambda: cache_service.get_cached_response(
            f"never asked {next(new)}", model=MODEL),
        "store (cache_response)": lambda: cache_service.cache_response(
            f"never asked {next(new)}", answer, model=MODEL),
    }
    for operation in operations.values():
        operation()  # warm: clients, scripts loaded
    commands = {name: commands_of(master, operation) for name, operation in operations.items()}
    return {
        "answer_bytes": args.answer_bytes,
        "entries": len(asked),
        "entry_memory_usage_bytes": round(entry_bytes),
        "used_memory_per_entry_and_event_bytes": round((used_after - used_before) / len(asked)),
        "commands": commands,
    }


def stream_costs(master: ClusterNode, prefix: str) -> dict:
    """Bytes per usage event, over every shard's stream (after the hit phases, so mostly
    hit events; each stream holds at most STREAM_MAXLEN / 256, approximately)."""
    from ragcache.keys import layout

    client = master.client()
    try:
        streams = [s for s in layout(prefix).streams if client.exists(s)]
        events = sum(client.xlen(s) for s in streams)
        memory = sum(client.memory_usage(s, samples=0) for s in streams)
        last = client.xrevrange(streams[0], count=1)[0][1]
    finally:
        client.close()
    return {"usage_events": events, "stream_bytes_per_event": round(memory / events) if events else None,
            "hit_event_field_bytes": sum(len(k) + len(v) for k, v in last.items())}


# --- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--answer-bytes", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--replica", action="store_true", help="give the master a replica (pinned with the clients)")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--client", choices=("e2e", "pipelined", "pipelined-miss", "pipelined-store"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--master-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return

    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    started, load_before = _common.now(), _common.load_average()
    directory = tempfile.mkdtemp(prefix="ragcache-bench-cluster-")
    nodes: list[ClusterNode] = []
    try:
        start_cluster(pin, args.replica, directory, nodes)
        master, replica = nodes[0], (nodes[1] if args.replica else None)
        os.environ["REDIS_CLUSTER_URL"] = f"redis://127.0.0.1:{master.port}"
        prefix = _common.prepare_env(redis_url=f"redis://127.0.0.1:{master.port}/0")
        _common.setup_django(migrate=True)
        _common.configure_shipped_logging()
        _common.pin_self(0 if pin else None)
        from ragcache.policies import registry

        registry.invalidate()
        cost = costs(master, args, prefix)
        phases = [run_clients(mode, args, master, pin) for mode in ("e2e", "pipelined", "pipelined-miss",
                                                                      "pipelined-store")]
        cost.update(stream_costs(master, prefix))
        placement = _common.Placement()
        placement.add("master", master.process.pid)
        if replica:
            placement.add("replica", replica.process.pid)
        where = _common.Placement.text(placement.snapshot())
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(directory, ignore_errors=True)

    _common.header("Redis Cluster: one master's costs and capacity", where, load_before, _common.load_average(),
                   started, f"{args.clients} client processes on cpu0, {args.seconds:.0f} s per phase; "
                   f"replica: {'yes' if replica else 'no'}; answers of {args.answer_bytes} bytes")
    print(f"   entry: MEMORY USAGE {cost['entry_memory_usage_bytes']} bytes; used_memory per stored answer "
          f"(entry + store event) {cost['used_memory_per_entry_and_event_bytes']} bytes")
    print(f"   usage event: {cost['stream_bytes_per_event']} bytes in the stream "
          f"({cost['usage_events']} events over the shards' streams; a hit event's fields and values: "
          f"{cost['hit_event_field_bytes']} bytes)")
    for name, commands in cost["commands"].items():
        print(f"   {name}: {commands.get('evalsha', 0)} round trip(s); commands {commands}")
    print("   phases: e2e = get_cached_response hits from the client processes; pipelined = the same LOOKUP "
          "hits sent 100 per pipeline; -miss = LOOKUPs of absent keys; -store = STOREs of 2 KB answers")
    _common.print_rows(
        [("mode", "phase", ""), ("ops_per_s", "ops/s", "d"), ("master_cpu_pct", "master CPU %", ".1f"),
         ("master_cpu_us_per_op", "master CPU µs/op", ".1f"), ("ops_per_master_cpu_s", "ops per master CPU-s", "d")],
        phases)
    _common.write_json(_common.RESULTS / "cluster.json", {
        "started": started, "placement": where, "git": _common.git_head(), "machine": _common.machine_facts(),
        "args": {k: v for k, v in vars(args).items() if k not in ("client", "start_at", "master_port")},
        "costs": cost, "phases": phases})


if __name__ == "__main__":
    main()
