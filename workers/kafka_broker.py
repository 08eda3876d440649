"""Apache Kafka itself (4.x, KRaft mode: one node that is broker and controller) as a child
process, for the integration tests' reference broker. No Docker and no download at run time
beyond Maven: the jars come from Maven Central through ``deploy/kafka/pom.xml`` (the version is
pinned there) and are kept in ``.streamrec/kafka-VERSION/libs`` so later runs reuse them.

Needs Java 17 or newer; Maven only while the jars are not cached yet. Without them,
:class:`KafkaUnavailable` says what is missing (the test fixture turns it into a skip).

Optionally secured: with ``users`` the broker also listens on SASL_PLAINTEXT (PLAIN, SCRAM-SHA-256
and SCRAM-SHA-512, every user with every mechanism), and with ``tls=True`` on SASL_SSL too, with a
self-signed certificate made by ``keytool`` (its PEM is :attr:`ApacheKafka.ca_file`). The PLAINTEXT
listener stays, for the broker itself and for readiness checks."""

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
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SAFE = re.compile(r"[A-Za-z0-9._-]+")  # user names and passwords written into JAAS and --add-scram


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


def cached_libs(version: str, cache_root: Path = CACHE_ROOT) -> Optional[Path]:
    """The folder of the broker's jars for ``version`` if a resolution completed it, else None."""
    libs = cache_root / f"kafka-{version}" / "libs"
    return libs if (libs / COMPLETE).exists() else None


def resolve_libs(version: str, cache_root: Path = CACHE_ROOT, pom: Path = POM, timeout_s: float = 600) -> Path:
    """The folder of the broker's jars for ``version``: reused when complete, else filled by
    Maven from Maven Central (into a temporary folder first, so an interrupted run leaves nothing
    half done)."""
    libs = cached_libs(version, cache_root)
    if libs is not None:
        return libs
    libs = cache_root / f"kafka-{version}" / "libs"
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


def auto_broker(cache_root: Path = CACHE_ROOT, pom: Path = POM) -> tuple[str, str]:
    """``("apache-kafka", why)`` where Java 17+ runs and the jars are cached or Maven can fetch
    them, else ``("tansu", why)``: what ``streamrec up`` starts when no broker is named."""
    try:
        java_bin()
    except KafkaUnavailable as exc:
        return "tansu", str(exc)
    version = pinned_version(pom)
    cached = cached_libs(version, cache_root) is not None
    if not cached and not shutil.which("mvn"):
        return "tansu", f"maven (mvn) not found on PATH, and the Apache Kafka {version} jars are not cached"
    return "apache-kafka", f"java {MIN_JAVA}+ found, Apache Kafka {version} jars {'cached' if cached else 'fetched by maven'}"


def formatted_cluster_id(data: Path) -> Optional[str]:
    """The cluster id of a log directory formatted before (its ``meta.properties``), or None: a
    broker started again on its data must be formatted with the same id, or the format fails."""
    try:
        text = (data / "meta.properties").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "cluster.id" and value.strip():
            return value.strip()
    return None


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
        # recordings replay with their original times: deleting by age would drop them at once
        "log.retention.ms": "-1",
    }


def security_properties(host: str, port: int, controller_port: int, users: dict[str, str], sasl_port: int,
                        sasl_ssl_port: int = 0, keystore: Optional[Path] = None,
                        keystore_password: str = "") -> dict[str, str]:
    """Properties to lay over :func:`server_properties`: SASL_PLAINTEXT on ``sasl_port`` (and
    SASL_SSL on ``sasl_ssl_port`` with a PKCS12 ``keystore``), PLAIN users from the listener's
    JAAS config, SCRAM users from the metadata log (see :func:`scram_format_args`)."""
    check_users(users)
    names = {"SASL_PLAINTEXT": sasl_port, **({"SASL_SSL": sasl_ssl_port} if sasl_ssl_port else {})}
    listeners = [f"PLAINTEXT://{host}:{port}"] + [f"{n}://{host}:{p}" for n, p in names.items()]
    plain = " ".join(f'user_{u}="{pw}"' for u, pw in users.items())
    props = {
        "listeners": ",".join(listeners + [f"CONTROLLER://{host}:{controller_port}"]),
        "advertised.listeners": ",".join(listeners),
        "listener.security.protocol.map": ",".join(
            ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"] + [f"{n}:{n}" for n in names]),
        "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
    }
    for n in names:
        prefix = f"listener.name.{n.lower()}"
        props[f"{prefix}.plain.sasl.jaas.config"] = \
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain};"
        for mech in SASL_MECHANISMS[1:]:
            props[f"{prefix}.{mech.lower()}.sasl.jaas.config"] = \
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    if sasl_ssl_port:
        if keystore is None:
            raise ValueError("a SASL_SSL listener needs a keystore")
        props.update({"ssl.keystore.location": str(keystore), "ssl.keystore.type": "PKCS12",
                      "ssl.keystore.password": keystore_password, "ssl.key.password": keystore_password,
                      "ssl.client.auth": "none"})
    return props


def check_users(users: dict[str, str]) -> None:
    bad = [u for u, pw in users.items() if not _SAFE.fullmatch(u) or not _SAFE.fullmatch(pw)]
    if bad or not users:
        raise ValueError(f"Kafka test users need names and passwords of [A-Za-z0-9._-] (bad: {bad or 'none given'})")


def scram_format_args(users: dict[str, str]) -> list[str]:
    """``StorageTool format`` arguments that create every user for both SCRAM mechanisms."""
    check_users(users)
    return [arg for mech in SASL_MECHANISMS[1:] for u, pw in users.items()
            for arg in ("--add-scram", f"{mech}=[name={u},password={pw}]")]


def make_keystore(java: str, folder: Path, host: str, password: str) -> tuple[Path, Path]:
    """A self-signed server certificate for ``host`` (its IP or name, and localhost) in a PKCS12
    keystore, and the certificate as PEM for clients to trust; returns (keystore, pem)."""
    keytool = Path(java).with_name("keytool")
    tool = str(keytool) if keytool.exists() else shutil.which("keytool")
    if not tool:
        raise KafkaUnavailable(f"keytool not found next to {java} or on PATH (needed for the TLS listener)")
    folder.mkdir(parents=True, exist_ok=True)
    keystore, pem = folder / "broker.p12", folder / "broker-ca.pem"
    keystore.unlink(missing_ok=True)
    san = f"IP:{host}" if re.fullmatch(r"[0-9.]+", host) else f"DNS:{host}"
    steps = [
        ["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", "7",
         "-dname", f"CN={host}", "-ext", f"SAN={san},DNS:localhost", "-ext", "BC:c=ca:true",
         "-keystore", str(keystore), "-storetype", "PKCS12", "-storepass", password, "-keypass", password],
        ["-exportcert", "-rfc", "-alias", "broker", "-keystore", str(keystore), "-storepass", password,
         "-file", str(pem)],
    ]
    for args in steps:
        res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                             check=False)
        if res.returncode != 0:
            raise RuntimeError(f"keytool {args[0]} failed (exit {res.returncode}): {(res.stdout + res.stderr)[-2000:]}")
    return keystore, pem


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
    (SIGTERM, then SIGKILL after a timeout). The broker's output goes to ``base_dir/kafka.log``.

    ``users`` (name to password) adds a SASL_PLAINTEXT listener (:attr:`sasl_bootstrap`) where they
    log in with PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; ``tls=True`` adds SASL_SSL
    (:attr:`sasl_ssl_bootstrap`, trusting :attr:`ca_file`)."""

    def __init__(self, base_dir: Path, port: int = 0, version: Optional[str] = None,
                 cache_root: Path = CACHE_ROOT, host: str = "127.0.0.1", *,
                 users: Optional[dict[str, str]] = None, tls: bool = False) -> None:
        if tls and not users:
            raise ValueError("tls=True needs users (the TLS listener is SASL_SSL)")
        if users:
            check_users(users)
        self.base_dir = Path(base_dir)
        self.port = port
        self.users = dict(users or {})
        self.tls = tls
        self.sasl_port = 0
        self.sasl_ssl_port = 0
        self.ca_file: Optional[Path] = None
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

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_PLAINTEXT listener (needs ``users``)."""
        return f"{self.host}:{self.sasl_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """The SASL_SSL listener (needs ``tls=True``)."""
        return f"{self.host}:{self.sasl_ssl_port}"

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
        taken = {self.port} if self.port else set()

        def port() -> int:
            p = free_port()
            while p in taken:
                p = free_port()
            taken.add(p)
            return p

        self.port = self.port or port()
        self.controller_port = port()
        data = self.base_dir / "data"
        props = self.base_dir / "server.properties"
        config = server_properties(data, self.port, self.controller_port, self.host)
        scram: list[str] = []
        if self.users:
            self.sasl_port = port()
            self.sasl_ssl_port = port() if self.tls else 0
            keystore, secret = None, ""
            if self.tls:
                secret = uuid.uuid4().hex
                keystore, self.ca_file = make_keystore(java, self.base_dir / "tls", self.host, secret)
            config.update(security_properties(self.host, self.port, self.controller_port, self.users,
                                              self.sasl_port, self.sasl_ssl_port, keystore, secret))
            scram = scram_format_args(self.users)
        write_properties(props, config)
        log4j = self.base_dir / "log4j2.properties"
        log4j.write_text(LOG4J2)
        base = [java, *HEAP, *JVM_OPTS, f"-Dlog4j2.configurationFile={log4j}",
                f"-Dkafka.logs.dir={self.base_dir}", "-cp", str(libs / "*")]
        fmt = subprocess.run([*base, "kafka.tools.StorageTool", "format", "--standalone", "--ignore-formatted",
                              "--cluster-id", formatted_cluster_id(data) or random_cluster_id(), "--config", str(props),
                              *scram],
                             capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                             check=False)
        if fmt.returncode != 0:
            raise RuntimeError(f"kafka storage format failed (exit {fmt.returncode}):\n"
                               f"{(fmt.stdout + fmt.stderr)[-3000:]}")
        self.proc = subprocess.Popen([*base, "kafka.Kafka", str(props)], stdout=self.log_path.open("ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            for p in (self.port, self.sasl_port, self.sasl_ssl_port):
                if p:
                    wait_for(lambda p=p: port_open(p), "Apache Kafka", max(deadline - time.monotonic(), 1.0),
                             self.proc, self.log_path)
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
