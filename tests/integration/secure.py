"""Secured services for tests/integration/test_security.py: a ``redis-server`` that needs a
password, with an ACL user too (the Apache Kafka with SASL and TLS is
:class:`workers.kafka_broker.ApacheKafka` with ``users`` and ``tls``)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

from workers.stack import free_port, port_open, redis_server_bin, wait_for


class SecureRedis:
    """``redis-server`` whose ``default`` user needs ``password`` and with ACL users ``users``
    (name to password, every key and command allowed). :attr:`url` holds no credentials."""

    def __init__(self, data_dir: Path, password: str, users: dict[str, str]) -> None:
        self.data_dir = Path(data_dir)
        self.password = password
        self.users = dict(users)
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.data_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> "SecureRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        acl = [arg for name, pw in self.users.items() for arg in ("--user", name, "on", f">{pw}", "~*", "&*", "+@all")]
        self.proc = subprocess.Popen(
            [redis_server_bin(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.data_dir), "--requirepass", self.password, *acl],
            stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: port_open(self.port), "redis-server", timeout_s, self.proc, self.log_path)
            wait_for(self._ready, "redis-server", timeout_s, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        import redis

        r = redis.Redis(port=self.port, password=self.password, socket_timeout=2)
        try:
            return bool(r.ping())
        finally:
            r.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> "SecureRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
