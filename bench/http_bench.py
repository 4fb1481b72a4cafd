"""HTTP rows of ``bench/hotpath.py`` (group ``http``): the demo JSON endpoint against a
plain view on the same server, under load from ``wrk`` (Debian package ``wrk``).

- async: uvicorn (1 worker, pinned) serving ``/bench/ask-async.json`` (the demo endpoint
  as an async view, ``aget_or_call``) vs ``/bench/plain-async.json`` (one raw
  ``redis.asyncio`` GET of the same bytes).
- sync: gunicorn (1 gthread worker, pinned) serving ``/demo/ask.json`` (``get_or_call``)
  vs ``/bench/plain.json`` (a django-redis ``get`` of the same bytes).

Both endpoints of a pair go through the same server, settings (``bench/http_settings.py``:
the project's middleware and its shipped logging, written to /dev/null) and load: fixed
connections and duration, rounds alternating A B / B A, loopback only. Before the load
each endpoint is checked (200, ``"hit": true``), and the server's own
``ragcache_lookups_total{result="hit"}`` is read before and after, so a miss or an error
under load cannot pass unseen.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse

from bench import _common

QUESTION = "How do I rotate the API keys of a production service without downtime? Keep it short."
HIT_LINE = re.compile(r'^ragcache_lookups_total\{([^}]*)\}\s+([0-9.e+]+)', re.M)
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _hits(port: int) -> float:
    status, body = _get(port, "/metrics")
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    total = 0.0
    for labels, value in HIT_LINE.findall(body.decode()):
        if 'result="hit"' in labels and 'policy="default"' in labels:
            total += float(value)
    return total


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    return float(match.group(1)) * UNITS[match.group(2)] if match else float("nan")


def parse_wrk(output: str) -> dict:
    def find(pattern: str, default: str = "0") -> str:
        match = re.search(pattern, output, re.M)
        return match.group(1) if match else default

    requests = int(find(r"^\s*(\d+) requests in"))
    seconds = _ms(find(r"requests in ([0-9.]+[a-z]+),", "nan")) / 1000
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", find(r"Socket errors: (.*)$", "")))
    return {
        "requests": requests,
        "seconds": seconds,
        "non_2xx": int(find(r"Non-2xx or 3xx responses: (\d+)")),
        "socket_errors": errors,
        "p50_ms": _ms(find(r"^\s*50%\s+(\S+)", "nan")),
        "p99_ms": _ms(find(r"^\s*99%\s+(\S+)", "nan")),
    }


def wrk(port: int, path: str, *, connections: int, seconds: float, cpu: int | None, placement: dict) -> dict:
    cmd = [*_common.taskset(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s",
           "--latency", f"http://127.0.0.1:{port}{path}"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(min(0.5, seconds / 2))
    placement.setdefault("wrk", _common.cpus_text(_common.affinity(process.pid)))
    try:
        output, _ = process.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        _common.stop(process)
        raise SystemExit("wrk did not finish in time") from None
    if process.returncode != 0:
        raise SystemExit(f"wrk failed: {output[-500:]}")
    return parse_wrk(output)


class Server:
    def __init__(self, kind: str, ctx, args) -> None:
        self.kind = kind
        self.port = _common.free_port()
        env = dict(os.environ, DJANGO_SETTINGS_MODULE="bench.http_settings", PYTHONPATH=str(_common.ROOT),
                   DEMO_LLM_DELAY_MS="0", BENCH_MIDDLEWARE=args.http_middleware)
        bind = ["127.0.0.1", str(self.port)]
        if kind == "uvicorn":
            cmd = [sys.executable, "-m", "uvicorn", "project.asgi:application", "--host", bind[0], "--port", bind[1],
                   "--workers", "1", "--lifespan", "off", "--log-level", "warning", "--no-access-log"]
        else:
            cmd = [sys.executable, "-m", "gunicorn", "project.wsgi:application", "--bind", ":".join(bind),
                   "--workers", "1", "--worker-class", "gthread", "--threads", str(args.http_threads),
                   "--keep-alive", "30", "--log-level", "warning"]
        self.process = subprocess.Popen([*_common.taskset(args.bench_cpu), *cmd], env=env, cwd=str(_common.ROOT),
                                        stdin=subprocess.DEVNULL)
        _common.wait_for_port(self.port, self.process, kind)

    def pids(self) -> list[int]:
        """The server and its workers (gunicorn forks one)."""
        pids = [self.process.pid]
        try:
            with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as children:
                pids += [int(p) for p in children.read().split()]
        except OSError:
            pass
        return pids

    def stop(self) -> None:
        _common.stop(self.process, 15)


def _prime(server: Server, demo: str, plain: str, plain_key_writer) -> bytes:
    """A miss then a hit on the demo endpoint; the plain view then serves the hit's bytes."""
    status, first = _get(server.port, demo)
    if status != 200:
        raise SystemExit(f"{server.kind} {demo} -> {status}: {first[:300]!r}")
    status, body = _get(server.port, demo)
    if status != 200 or b'"hit": true' not in body:
        raise SystemExit(f"{server.kind}: the demo endpoint did not hit on the second request: {body[:200]!r}")
    plain_key_writer(body)
    status, plain_body = _get(server.port, plain)
    if status != 200 or b'"hit": true' not in plain_body:
        raise SystemExit(f"{server.kind}: {plain} -> {status}: {plain_body[:200]!r}")
    return body


def run_pair(kind: str, ctx, args) -> dict:
    from django.core.cache import caches

    from bench import http_urls

    question = urllib.parse.quote(QUESTION + f" ({kind})")
    if kind == "uvicorn":
        demo, plain = f"/bench/ask-async.json?q={question}", "/bench/plain-async.json"
        labels = {"demo": "async demo endpoint, aget_or_call hit", "plain": "async plain view, one redis.asyncio GET"}

        def write_plain(body: bytes) -> None:
            ctx.raw_client().set(http_urls.PLAIN_RAW_KEY, body, ex=3600)
    else:
        demo, plain = f"/demo/ask.json?q={question}", "/bench/plain.json"
        labels = {"demo": "sync demo endpoint, get_or_call hit", "plain": "sync plain view, django-redis get"}

        def write_plain(body: bytes) -> None:
            caches["ragcache"].set(http_urls.PLAIN_KEY, body.decode(), timeout=3600)

    load_before, started = _common.load_average(), _common.now()
    server = Server(kind, ctx, args)
    placement: dict = {}
    try:
        body = _prime(server, demo, plain, write_plain)
        for path in (demo, plain):  # warm-up
            wrk(server.port, path, connections=args.http_connections, seconds=args.http_warmup,
                cpu=args.redis_cpu, placement=placement)
        hits_before = _hits(server.port)
        runs: dict[str, list[dict]] = {"demo": [], "plain": []}
        for round_no in range(args.http_rounds):
            order = ["demo", "plain"] if round_no % 2 == 0 else ["plain", "demo"]
            for name in order:
                runs[name].append(wrk(server.port, demo if name == "demo" else plain,
                                      connections=args.http_connections, seconds=args.http_seconds,
                                      cpu=args.redis_cpu, placement=placement))
        hits_after = _hits(server.port)
        snapshot = ctx.placement.snapshot()
        snapshot.pop("bench", None)
        server_cpus = sorted({c for pid in server.pids() for c in _common.affinity(pid)})
        snapshot = {kind: _common.cpus_text(server_cpus), **snapshot, **placement}
    finally:
        server.stop()
    rows = []
    for name in ("demo", "plain"):
        done = sum(r["requests"] for r in runs[name])
        seconds = sum(r["seconds"] for r in runs[name])
        rows.append({
            "case": f"{kind}: {labels[name]}",
            "endpoint": demo.split("?")[0] if name == "demo" else plain,
            "requests": done,
            "req_per_s": round(done / seconds, 1) if seconds else None,
            "p50_ms": round(sorted(r["p50_ms"] for r in runs[name])[len(runs[name]) // 2], 3),
            "p99_ms": round(max(r["p99_ms"] for r in runs[name]), 3),
            "non_2xx": sum(r["non_2xx"] for r in runs[name]),
            "socket_errors": sum(r["socket_errors"] for r in runs[name]),
        })
    demo_row, plain_row = rows
    ratio = demo_row["req_per_s"] / plain_row["req_per_s"]
    demo_row["ratio"], plain_row["ratio"] = round(ratio, 3), 1.0
    hits = hits_after - hits_before
    for row in rows:
        row["placement"] = _common.Placement.text(snapshot)
    return {
        "server": kind, "rows": rows, "ratio": round(ratio, 3), "started": started, "load_before": load_before,
        "load_after": _common.load_average(), "placement": snapshot,
        "demo_hits_counted_by_server": int(hits), "demo_bytes": len(body),
        # wrk stops at its deadline with requests in flight: the server may count a few
        # more hits than wrk counted responses, never fewer.
        "every_demo_request_a_hit": hits >= demo_row["requests"],
    }


def run_group(ctx, args) -> dict:
    if shutil.which("wrk") is None:
        print("\n== HTTP rows skipped: wrk is not installed (Debian: apt-get install wrk)")
        return {"skipped": "wrk not installed"}
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    result = {"wrk": version, "pairs": []}
    for kind in ("uvicorn", "gunicorn"):
        pair = run_pair(kind, ctx, args)
        result["pairs"].append(pair)
        what = ("uvicorn 1 worker (asyncio loop)" if kind == "uvicorn"
                else f"gunicorn 1 gthread worker x {args.http_threads} threads")
        _common.header(f"HTTP, {what}; wrk 1 thread x {args.http_connections} connections, "
                       f"{args.http_rounds} alternating rounds of {args.http_seconds:g} s per endpoint"
                       f"{'' if args.http_middleware == 'project' else ', no middleware'}",
                       _common.Placement.text(pair["placement"]), pair["load_before"], pair["load_after"],
                       pair["started"],
                       f"every demo request a hit (server's own counter): {pair['every_demo_request_a_hit']} "
                       f"({pair['demo_hits_counted_by_server']} hits for {pair['rows'][0]['requests']} requests)")
        _common.print_rows([("case", "case", ""), ("req_per_s", "req/s", ".1f"), ("p50_ms", "p50 ms", ".2f"),
                            ("p99_ms", "p99 ms", ".2f"), ("non_2xx", "non-2xx", "d"),
                            ("socket_errors", "sock err", "d"), ("ratio", "x plain", ".3f")],
                           pair["rows"])
    return result
