"""Apache Kafka itself (4.x, KRaft mode: one node that is broker and controller) as a child
process, for the integration tests' reference broker. No Docker and no download at run time
beyond Maven: the jars come from Maven Central through ``deploy/kafka/pom.xml`` (the version is
pinned there) and are kept in ``.streamrec/kafka-VERSION/libs`` so later runs reuse them.

Needs Java 17 or newer; Maven only while the jars are not cached yet. Without them,
:class:`KafkaUnavailable` says what is missing (the test fixture turns it into a skip)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from workers.stack import free_port, port_open, wait_for

ROOT = Path(__file__).resolve().parent.parent
POM = ROOT / "deploy" / "kafka" / "pom.xml"
CACHE_ROOT = ROOT / ".streamrec"  # git-ignored
MIN_JAVA = 17
HEAP = ["-Xmx512m", "-Xms128m"]
# What bin/kafka-run-class.sh passes as KAFKA_JVM_PERFORMANCE_OPTS.
JVM_OPTS = ["-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true"]
COMPLETE = ".complete"  # marks a libs folder that Maven filled completely


class KafkaUnavailable(RuntimeError):
    """A prerequisite (Java 17+, or Maven while the jars are not cached) is missing."""


def pinned_version(pom: Path = POM) -> str:
    """``kafka.version`` from the pom: the one place the version is written."""
    m = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if not m:
        raise ValueError(f"no <kafka.version> in {pom}")
    return m.group(1)


def java_bin() -> str:
    """``java`` from ``$JAVA_HOME/bin`` or PATH, checked to be Java 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    in_home = Path(home) / "bin" / "java" if home else None
    found = str(in_home) if in_home and in_home.exists() else shutil.which("java")
    if not found:
        raise KafkaUnavailable(f"java {MIN_JAVA}+ not found (no JAVA_HOME/bin/java, no java on PATH)")
    major = java_major(found)
    if major < MIN_JAVA:
        raise KafkaUnavailable(f"Apache Kafka 4 needs java {MIN_JAVA}+, {found} is java {major}")
    return found


def java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        raise KafkaUnavailable(f"cannot tell the version of {java}: {(out.stderr or out.stdout).strip()[:200]}")
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0_392" is java 8


def resolve_libs(version: str, cache_root: Path = CACHE_ROOT, pom: Path = POM, timeout_s: float = 600) -> Path:
    """The folder of the broker's jars for ``version``: reused when complete, else filled by
    Maven from Maven Central (into a temporary folder first, so an interrupted run leaves nothing
    half done)."""
    libs = cache_root / f"kafka-{version}" / "libs"
    if (libs / COMPLETE).exists():
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise KafkaUnavailable(f"maven (mvn) not found on PATH, and the Apache Kafka {version} jars are not "
                               f"cached in {libs}")
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    try:
        cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom), f"-Dkafka.version={version}",
               "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                             check=False)
        jar = tmp / f"kafka_2.13-{version}.jar"
        if res.returncode != 0 or not jar.exists():
            raise RuntimeError(f"maven could not resolve org.apache.kafka:kafka_2.13:{version} "
                               f"(exit {res.returncode}): {' '.join(cmd)}\n{(res.stdout + res.stderr)[-3000:]}")
        (tmp / COMPLETE).write_text(f"org.apache.kafka:kafka_2.13:{version}\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            tmp.rename(libs)
        except OSError:  # another run filled it meanwhile
            if not (libs / COMPLETE).exists():
                shutil.rmtree(libs, ignore_errors=True)
                tmp.rename(libs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return libs


def random_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding, as
    ``kafka-storage.sh random-uuid`` prints (never starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def server_properties(log_dir: Path, port: int, controller_port: int, host: str = "127.0.0.1",
                      partitions: int = 4) -> dict[str, str]:
    """One node, broker and controller, single-voter quorum, everything replicated once."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": str(partitions),
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
    }


def write_properties(path: Path, props: dict[str, str]) -> None:
    def esc(v: str) -> str:  # java.util.Properties: backslashes and leading spaces need escaping
        return v.replace("\\", "\\\\")
    path.write_text("".join(f"{k}={esc(v)}\n" for k, v in props.items()))


LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class ApacheKafka:
    """``with ApacheKafka(dir) as k: ... k.bootstrap ...``: formats a fresh KRaft log dir in
    ``base_dir``, starts the broker, waits until it answers metadata requests, and stops it
    (SIGTERM, then SIGKILL after a timeout). The broker's output goes to ``base_dir/kafka.log``."""

    def __init__(self, base_dir: Path, port: int = 0, version: Optional[str] = None,
                 cache_root: Path = CACHE_ROOT, host: str = "127.0.0.1") -> None:
        self.base_dir = Path(base_dir)
        self.port = port
        self.controller_port = 0
        self.host = host
        self.version = version or pinned_version()
        self.cache_root = Path(cache_root)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base_dir / "kafka.log"
        self.startup_s: Optional[float] = None  # format + start until it answers, jars already resolved
        self.resolve_s: Optional[float] = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def check(self) -> tuple[str, Path]:
        """(java, libs folder), resolving the jars if needed; raises :class:`KafkaUnavailable`."""
        java = java_bin()
        t = time.monotonic()
        libs = resolve_libs(self.version, self.cache_root)
        self.resolve_s = round(time.monotonic() - t, 2)
        return java, libs

    def start(self, timeout_s: float = 120.0) -> "ApacheKafka":
        java, libs = self.check()
        t0 = time.monotonic()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        data = self.base_dir / "data"
        props = self.base_dir / "server.properties"
        write_properties(props, server_properties(data, self.port, self.controller_port, self.host))
        log4j = self.base_dir / "log4j2.properties"
        log4j.write_text(LOG4J2)
        base = [java, *HEAP, *JVM_OPTS, f"-Dlog4j2.configurationFile={log4j}",
                f"-Dkafka.logs.dir={self.base_dir}", "-cp", str(libs / "*")]
        fmt = subprocess.run([*base, "kafka.tools.StorageTool", "format", "--standalone", "--ignore-formatted",
                              "--cluster-id", random_cluster_id(), "--config", str(props)],
                             capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                             check=False)
        if fmt.returncode != 0:
            raise RuntimeError(f"kafka storage format failed (exit {fmt.returncode}):\n"
                               f"{(fmt.stdout + fmt.stderr)[-3000:]}")
        self.proc = subprocess.Popen([*base, "kafka.Kafka", str(props)], stdout=self.log_path.open("ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            wait_for(lambda: port_open(self.port), "Apache Kafka", timeout_s, self.proc, self.log_path)
            wait_for(self._ready, "Apache Kafka metadata", max(deadline - time.monotonic(), 1.0), self.proc,
                     self.log_path)
        except BaseException:
            self.stop()
            raise
        self.startup_s = round(time.monotonic() - t0, 2)
        return self

    def _ready(self) -> bool:
        """The broker answers metadata requests and lists itself, unfenced."""
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=[self.bootstrap], request_timeout_ms=5000,
                                 client_id="streamrec-kafka-ready")
        try:
            admin.list_topics()
            cluster = admin.describe_cluster()
            return any(not b.get("is_fenced") for b in cluster.get("brokers", []))
        finally:
            admin.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def __enter__(self) -> "ApacheKafka":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
