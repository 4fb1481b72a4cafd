"""A real local Redis Cluster for the tests: 3 masters + 3 replicas of ``redis-server
--cluster-enabled yes`` on free loopback ports (never 6379), no persistence, files under
a temporary directory, joined with ``redis-cli --cluster create --cluster-replicas 1``.

One cluster per test session, started on first use, repaired if a test stopped a node,
torn down at the end. Fixtures (imported by tests/conftest.py):

- ``redis_cluster``: the running ``LocalCluster``.
- ``cluster_backend``: ragcache pointed at it (``RAGCACHE["REDIS_CLUSTER_URL"]``); this
  test's keys are removed from every master afterwards.
- ``backend``: parametrised ``standalone`` / ``cluster`` for the contract tests.
- ``one_slot_guard``: records every command whose ragcache keys span several hash slots.

Node timeout is 1 s (production default: 15 s) so that a failover takes seconds here;
``cluster-require-full-coverage no`` as docs/scaling.md recommends for a cache, so that a
failed master stops only its own slots.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis as redis_lib
from redis.crc import key_slot

NODE_TIMEOUT_MS = 1000
MASTERS = 3
REPLICAS_PER_MASTER = 1
RESERVED_PORTS = {6379}


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports, never a reserved one (6379)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sockets.append(sock)
            if port not in RESERVED_PORTS:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def cluster_info(node) -> dict[str, str]:
    """``CLUSTER INFO`` of one node (anything with a ``client()``) as a dict; bench/cluster.py uses it too."""
    client = node.client()
    try:
        text = client.execute_command("CLUSTER", "INFO")
    finally:
        client.close()
    text = text.decode() if isinstance(text, bytes) else text
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


class ClusterNode:
    """One ``redis-server --cluster-enabled yes`` process."""

    def __init__(self, directory: Path, port: int, bus_port: int) -> None:
        self.directory, self.port, self.bus_port = directory, port, bus_port
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        # The node config file is kept across a restart: the node rejoins with its own id.
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
             "--cluster-config-file", f"nodes-{self.port}.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--cluster-require-full-coverage", "no", "--cluster-replica-validity-factor", "0",
             "--repl-diskless-sync-delay", "0", "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--logfile", f"redis-{self.port}.log", "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = self.client(timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis_lib.RedisError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} did not start; see "
                                           f"{self.directory}/redis-{self.port}.log") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = 15) -> None:
        """Stop the process (SIGTERM by default; no persistence, so its data is gone)."""
        if self.alive():
            self.process.send_signal(sig)
            self.process.wait(10)

    def client(self, timeout: float = 1.0) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def role(self) -> str | None:
        client = self.client()
        try:
            return str(client.info("replication")["role"])
        except redis_lib.RedisError:
            return None
        finally:
            client.close()


class LocalCluster:
    """Start, inspect, break and repair the test cluster."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="ragcache-cluster-"))
        self._own_directory = directory is None
        count = MASTERS * (1 + REPLICAS_PER_MASTER)
        ports = _free_ports(2 * count)
        self.nodes = [ClusterNode(self.directory, ports[i], ports[count + i]) for i in range(count)]
        self.created = False

    @property
    def url(self) -> str:
        """The seed node, as ``RAGCACHE["REDIS_CLUSTER_URL"]`` takes it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> set[int]:
        return {node.port for node in self.nodes}

    def start(self) -> LocalCluster:
        """Idempotent: starts what is not running, creates the cluster once, and waits until
        every slot is served and every master has a replica in sync."""
        for node in self.nodes:
            if not node.alive():
                node.start()
        if not self.created:
            subprocess.run(
                [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                 *(node.address for node in self.nodes), "--cluster-replicas", str(REPLICAS_PER_MASTER),
                 "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
            )
            self.created = True
        self.wait_healthy()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # --- state ------------------------------------------------------------------------

    def slots(self) -> dict[int, tuple[int, int]]:
        """Port of each master -> covered range(s) as seen by a live node: {port: (first, last)}."""
        for node in self.nodes:
            if not node.alive():
                continue
            client = node.client()
            try:
                reply = client.execute_command("CLUSTER", "SLOTS")
            except redis_lib.RedisError:
                continue
            finally:
                client.close()
            ranges: dict[int, list[tuple[int, int]]] = {}
            for first, last, master, *_ in reply:
                ranges.setdefault(int(master[1]), []).append((int(first), int(last)))
            return {port: tuple(sorted(r)) for port, r in ranges.items()}
        return {}

    def master_of_slot(self, slot: int) -> int:
        for port, ranges in self.slots().items():
            if any(first <= slot <= last for first, last in ranges):
                return port
        raise LookupError(f"slot {slot} is not served")

    def master_of_key(self, key: str) -> int:
        return self.master_of_slot(key_slot(key.encode()))

    def masters(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive() and node.role() == "master"]

    def node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def healthy(self) -> bool:
        """Every node up, agreeing the cluster is ok over all 16384 slots, MASTERS masters
        each with a replica whose link is up."""
        if not all(node.alive() for node in self.nodes):
            return False
        try:
            for node in self.nodes:
                info = cluster_info(node)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384" \
                        or info.get("cluster_known_nodes") != str(len(self.nodes)):
                    return False
            masters = 0
            for node in self.nodes:
                client = node.client()
                try:
                    replication = client.info("replication")
                finally:
                    client.close()
                if replication["role"] == "master":
                    masters += 1
                    if int(replication.get("connected_slaves", 0)) < REPLICAS_PER_MASTER:
                        return False
                elif replication.get("master_link_status") != "up":
                    return False
            return masters == MASTERS and len(self.slots()) == MASTERS
        except redis_lib.RedisError:
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Redis Cluster did not become healthy; logs in {self.directory}")
            time.sleep(0.1)

    def repair(self) -> None:
        """Restart stopped nodes (they rejoin as replicas) and wait until healthy."""
        self.start()

    # --- keys -------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        """UNLINK every key under ``prefix`` on every master (one key per command: a
        master's keys span many slots)."""
        deleted = 0
        for node in self.masters():
            client = node.client(timeout=5)
            try:
                for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                    deleted += client.unlink(key)
            except redis_lib.RedisError:
                pass
            finally:
                client.close()
        return deleted


_session_cluster: LocalCluster | None = None


@pytest.fixture(scope="session")
def redis_cluster():
    """The session's local cluster, started on first use and stopped at session end. A test
    that breaks it (the failover test) leaves it to be repaired before the next user."""
    global _session_cluster
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("the cluster tests need redis-server and redis-cli (Debian package redis-server)")
    cluster = _session_cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        _session_cluster = None


@pytest.fixture
def cluster_backend(redis_cluster, settings, ragcache_prefix):
    """ragcache on the local cluster for this test; its keys are removed from every master."""
    from ragcache import connection
    from ragcache.policies import registry

    if not redis_cluster.healthy():
        redis_cluster.repair()
    settings.RAGCACHE = {**settings.RAGCACHE, "REDIS_CLUSTER_URL": redis_cluster.url}
    connection.reset()
    registry.invalidate()
    yield redis_cluster
    connection.reset()
    registry.invalidate()
    redis_cluster.delete_prefix(ragcache_prefix)


class SlotGuard:
    """Records each command sent to any Redis whose arguments name ragcache keys (anything
    starting with the test's key prefix) in more than one hash slot. Standalone commands
    are checked too: a layout that needs two slots in one command would fail on a cluster."""

    def __init__(self, prefix: str) -> None:
        self.marker = f"{prefix}:".encode()
        self.commands = 0
        self.violations: list[tuple[str, list[str]]] = []

    def check(self, args) -> None:
        named = []
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode()
            if isinstance(arg, (bytes, bytearray, memoryview)) and bytes(arg[:len(self.marker)]) == self.marker:
                named.append(bytes(arg))
        if not named:
            return
        self.commands += 1
        if len({key_slot(key) for key in named}) > 1:
            command = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            self.violations.append((command, [key.decode(errors="replace") for key in named]))


@pytest.fixture
def one_slot_guard(monkeypatch, ragcache_prefix):
    """Wrap the command packers of redis-py's sync and asyncio connections (every command,
    pipelined or not, of every client passes there) with a ``SlotGuard``; the test fails if
    any command spanned several slots."""
    import redis.asyncio.connection as async_connection
    import redis.connection as sync_connection

    guard = SlotGuard(ragcache_prefix)
    for name in ("PythonRespSerializer", "HiredisRespSerializer"):
        serializer = getattr(sync_connection, name, None)
        if serializer is None:
            continue
        original = serializer.pack

        def pack(self, *args, _original=original):
            guard.check(args)
            return _original(self, *args)

        monkeypatch.setattr(serializer, "pack", pack)
    original_async = async_connection.AbstractConnection.pack_command

    def pack_command(self, *args):
        guard.check(args)
        return original_async(self, *args)

    monkeypatch.setattr(async_connection.AbstractConnection, "pack_command", pack_command)
    yield guard
    assert guard.violations == [], f"commands spanning several hash slots: {guard.violations[:5]}"


@pytest.fixture(params=["standalone", "cluster"])
def backend(request, ragcache_prefix):
    """The contract's two backends: the standalone Redis at REDIS_URL, and the local cluster."""
    if request.param == "cluster":
        request.getfixturevalue("cluster_backend")
    return request.param
