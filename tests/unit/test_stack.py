"""The embedded stack's free ports: never handed to two processes at once."""

from __future__ import annotations

import os
import socket
import time

import pytest

from workers import stack
from workers.stack import free_port


class FakeSocket:
    """Binds to the next port of a fixed sequence, as the kernel would to port 0."""

    ports: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, addr):
        self.port = FakeSocket.ports.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_a_port_handed_out_is_held_and_another_is_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(stack.socket, "socket", FakeSocket)
    FakeSocket.ports = [5000, 5000, 5001]
    assert free_port(marks=tmp_path) == 5000
    assert free_port(marks=tmp_path) == 5001  # 5000 is held (say, by another test process)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5000", "5001"]


def test_a_stale_mark_is_cleared_but_not_taken_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(stack.socket, "socket", FakeSocket)
    (tmp_path / "5000").touch()
    old = time.time() - 3600
    os.utime(tmp_path / "5000", (old, old))
    FakeSocket.ports = [5000, 5002, 5000]
    assert free_port(hold_s=60, marks=tmp_path) == 5002
    assert free_port(hold_s=60, marks=tmp_path) == 5000  # cleared, so free again
    FakeSocket.ports = [5000] * 200
    with pytest.raises(RuntimeError, match="no free port"):
        free_port(marks=tmp_path)


def test_real_ports_are_bindable_and_distinct(tmp_path):
    ports = [free_port(marks=tmp_path) for _ in range(20)]
    assert len(set(ports)) == 20
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_the_index_server_runs_blas_on_one_thread_unless_told_otherwise(monkeypatch):
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert stack.index_server_env() == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # an operator's own choice is kept whole
    assert stack.index_server_env() == {}
