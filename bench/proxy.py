#!/usr/bin/env python
"""A userspace stand-in for a network delay: an asyncio TCP forwarder that holds every
read for ``--delay-ms`` before writing it on, in both directions, in order.

    python bench/proxy.py --upstream 127.0.0.1:6379 --delay-ms 0.25

It prints ``{"port": N}`` once it listens on 127.0.0.1:N, and on SIGTERM (or SIGINT) one
JSON line with what it forwarded and how long it actually held each read. It is what
``bench/hotpath.py --remote`` puts between the bench and a private redis-server, because
these machines' kernel has no ``sch_netem`` (``tc qdisc add ... netem`` is refused).

Sub-millisecond holds need two things asyncio does not do by default: the event loop
waits in ``select()`` (microsecond timeout) instead of ``epoll_wait()`` (whole
milliseconds, so 0.25 ms would become 1 ms), and the process's timer slack is lowered
from the kernel's 50 µs to 1 µs. With ``--delay-ms 0`` data is written on as soon as it
is read: that is the proxy's own cost, which the bench reports beside the delayed rows.
Loopback only; a bench tool, not a network emulator (no jitter, loss or bandwidth limit).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import selectors
import signal
import statistics
import sys
from collections import deque

PR_SET_TIMERSLACK = 29
SAMPLES = 200_000  # hold times kept for the report (the most recent ones)


class Stats:
    def __init__(self) -> None:
        self.reads = 0
        self.bytes = 0
        self.connections = 0
        self.held_us: deque[float] = deque(maxlen=SAMPLES)

    def report(self, delay_ms: float) -> dict:
        held = sorted(self.held_us)

        def pct(fraction: float) -> float | None:
            return round(held[min(len(held) - 1, round(fraction * (len(held) - 1)))], 1) if held else None

        return {
            "delay_ms": delay_ms,
            "connections": self.connections,
            "reads_forwarded": self.reads,
            "bytes_forwarded": self.bytes,
            "held_us_median": round(statistics.median(held), 1) if held else None,
            "held_us_p99": pct(0.99),
            "held_us_max": round(held[-1], 1) if held else None,
        }


class Side(asyncio.Protocol):
    """One end of a forwarded connection. What it reads is queued with a due time and
    written to ``peer`` when due; one timer per side serves the queue head, so order is kept."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, stats: Stats) -> None:
        self.loop, self.delay, self.stats = loop, delay, stats
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.queue: deque[tuple[float, float, bytes]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.early: list[bytes] = []  # read before the peer was connected
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=1 << 20)  # type: ignore[attr-defined]

    def link(self, peer: Side) -> None:
        self.peer = peer
        for data in self.early:
            self.data_received(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
            return
        now = self.loop.time()
        self.stats.reads += 1
        self.stats.bytes += len(data)
        if self.delay <= 0:
            self.stats.held_us.append((self.loop.time() - now) * 1e6)
            self.peer.write(data)
            return
        self.queue.append((now + self.delay, now, data))
        if self.timer is None:
            self.timer = self.loop.call_at(now + self.delay, self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, received, data = self.queue.popleft()
            self.stats.held_us.append((now - received) * 1e6)
            if self.peer is not None:
                self.peer.write(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._deliver)
        elif self.closed and self.peer is not None:
            self.peer.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # Back-pressure: when the peer cannot take more, stop reading this side.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close this side; the peer is closed once the queue has drained

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.queue and self.peer is not None:
            self.peer.close()


async def serve(upstream: tuple[str, int], delay: float, port: int) -> Stats:
    loop = asyncio.get_running_loop()
    stats = Stats()
    stopping = asyncio.Event()

    def accepted() -> Side:
        client = Side(loop, delay, stats)
        stats.connections += 1

        async def connect() -> None:
            try:
                _, server = await loop.create_connection(lambda: Side(loop, delay, stats), *upstream)
            except OSError:
                client.close()
                return
            server.link(client)
            client.link(server)

        loop.create_task(connect())
        return client

    server = await loop.create_server(accepted, "127.0.0.1", port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await stopping.wait()
    server.close()
    return stats


def lower_timer_slack(ns: int = 1000) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="host:port to forward to (loopback)")
    parser.add_argument("--delay-ms", type=float, default=0.25, help="hold of every read, each way (default 0.25)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if host not in {"127.0.0.1", "localhost", "::1"}:
        parser.error("the proxy forwards to loopback addresses only")
    slack = lower_timer_slack()
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        stats = loop.run_until_complete(serve((host, int(port)), args.delay_ms / 1000, args.port))
    finally:
        loop.close()
    print(json.dumps({**stats.report(args.delay_ms), "timer_slack_lowered": slack}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
