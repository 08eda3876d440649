"""A real Milvus standalone server without Docker: the server binary of the PyPI package ``milvus``
(2.3.5, embedded etcd, local storage and RocksMQ), with authentication on, as a child process on
loopback. For the tests and for trying the production index (HNSW, tokens) on one machine."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Optional

from workers.stack import wait_for

ROOT_PASSWORD = "Milvus"  # Milvus's default for the ``root`` user


class MilvusUnavailable(RuntimeError):
    """The ``milvus`` package (the standalone server) is not installed."""


class MilvusStandalone:
    """``milvus run standalone`` in ``data_dir``. Every port is picked free on the first start and
    kept for restarts, so clients reconnect to the same URI after :meth:`down` and :meth:`start`.

    Args:
        data_dir: the server's binaries, configuration, logs and data.
        auth: authentication on; clients then need :attr:`token` (``root:Milvus``).
    """

    def __init__(self, data_dir: str | Path, auth: bool = True) -> None:
        try:
            import milvus
        except ImportError as exc:  # pragma: no cover - install hint
            raise MilvusUnavailable("the Milvus standalone server needs the PyPI package 'milvus' (2.3.5): "
                                    "pip install -e '.[test]'") from exc
        self._pkg = milvus
        self.version = milvus.__version__
        self.data_dir = Path(data_dir).resolve()
        self.auth = auth
        self.proc: Optional[subprocess.Popen] = None
        self._config = None
        self.metrics_port = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        return int(self._config.get("proxy_port"))

    @property
    def token(self) -> str:
        return f"root:{ROOT_PASSWORD}" if self.auth else ""

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "milvus-stdout.log"

    def _configure(self) -> None:
        """Write the configuration: free ports (kept for restarts), storage under ``data_dir``."""
        m = self._pkg
        config = m.MilvusServerConfig(data_dir=str(self.data_dir))
        config.set("authorization_enabled", self.auth)
        config.resolve()  # picks free ports from each default upwards, writes configs/milvus.yaml
        for key, value in config.configurable_items.items():
            if key.endswith("_port"):
                config.configs[key] = value[1]
        port, sock = config.resolve_port(9091)
        sock.close()
        self.metrics_port = port
        self._embed_etcd_config(config)
        m._initialize_data_files(str(self.data_dir))  # the binaries, unpacked once per data_dir
        self._config = config

    def _embed_etcd_config(self, config) -> None:
        """The embedded etcd's own configuration: its peer port, fixed at 2380 otherwise (a second
        server on the machine would fail to start), and its client port from the configuration."""
        from workers.stack import free_port

        client, peer = int(config.get("etcd_port")), free_port()
        etcd = self.data_dir / "configs" / "etcd.yaml"
        etcd.write_text("\n".join([
            "name: default",
            f"data-dir: {config.get('etcd_data_dir')}",
            f"listen-client-urls: http://127.0.0.1:{client}",
            f"advertise-client-urls: http://127.0.0.1:{client}",
            f"listen-peer-urls: http://127.0.0.1:{peer}",
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer}",
            f"initial-cluster: default=http://127.0.0.1:{peer}",
            "initial-cluster-state: new", ""]))
        milvus_yaml = self.data_dir / "configs" / "milvus.yaml"
        text = milvus_yaml.read_text()
        if "\netcd:\n" not in "\n" + text:  # pragma: no cover - another template
            raise RuntimeError("the milvus package's configuration has no etcd section")
        milvus_yaml.write_text(("\n" + text).replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd}\n", 1)[1:])

    def start(self, timeout_s: float = 180.0) -> "MilvusStandalone":
        if self._config is None:
            self._configure()  # a restart keeps the configuration written (and its ports)
        exe = self.data_dir / "bin" / "milvus"
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.metrics_port),
               "MILVUS_RUN_DIR": str(self.data_dir / "run"),
               "LD_LIBRARY_PATH": ":".join(p for p in (str(exe.parent), os.environ.get("LD_LIBRARY_PATH")) if p)}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([str(exe), "run", "standalone"], cwd=self.data_dir, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_for(self.ready, f"Milvus standalone {self.version}", timeout_s, self.proc, self.log_path)
        return self

    def ready(self) -> bool:
        """Healthy (``/healthz``) and answering an authenticated call."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=3) as resp:
                if b"OK" not in resp.read():
                    return False
        except OSError:
            return False
        from streams.stores.milvus_items import milvus_client

        try:
            c = milvus_client(self.uri, self.token, timeout=5)
        except Exception:  # noqa: BLE001 - not serving yet
            return False
        try:
            c.list_collections()
            return True
        except Exception:  # noqa: BLE001 - not serving yet
            return False
        finally:
            c.close()

    def down(self, sig: int = signal.SIGKILL, timeout_s: float = 15.0) -> None:
        """Stop the server (SIGKILL by default: a crash). SIGTERM stops it slowly; after
        ``timeout_s`` it is killed."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> "MilvusStandalone":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.down(signal.SIGTERM, timeout_s=5.0)
