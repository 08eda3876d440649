"""Retry with backoff: transient errors are retried, others propagate."""

from __future__ import annotations

import asyncio

import pytest

from streams.retry import Backoff, retry_forever, transient


class Retriable(Exception):
    retriable = True


def test_transient_errors():
    assert transient(ConnectionError()) and transient(TimeoutError()) and transient(Retriable())
    assert not transient(ValueError()) and not transient(FileNotFoundError())


def test_retries_until_success_and_propagates_bugs():
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert asyncio.run(retry_forever(flaky, Backoff(base_s=0.001, cap_s=0.002), what="x")) == "ok"
    assert len(calls) == 3

    async def bug():
        raise ValueError("bug")

    with pytest.raises(ValueError):
        asyncio.run(retry_forever(bug, Backoff(base_s=0.001), what="x"))


def test_each_retry_is_logged_and_counted(caplog):
    import logging

    tries, counted = [], []

    async def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise TimeoutError("slow")
        return 7

    log = logging.getLogger("streamrec.test-retry")
    with caplog.at_level(logging.WARNING, logger="streamrec.test-retry"):
        got = asyncio.run(retry_forever(flaky, Backoff(base_s=0.001, cap_s=0.002), what="events commit", log=log,
                                        on_retry=counted.append))
    assert got == 7 and counted == ["events commit", "events commit"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("events commit failed (TimeoutError: slow); retry 1 in 0.00")
    assert lines[1].startswith("events commit failed (TimeoutError: slow); retry 2 in ")


def test_backoff_grows_to_its_cap():
    b = Backoff(base_s=0.1, cap_s=1.0)
    assert 0.05 <= b.delay(0) <= 0.1 and 0.5 <= b.delay(10) <= 1.0


def test_milvus_errors_that_no_retry_fixes_are_not_transient():
    from pymilvus.exceptions import MilvusException, ParamError

    class RpcError(Exception):
        def __init__(self, name):
            self._name = name

        def code(self):
            return type("Code", (), {"name": self._name})()

    RpcError.__module__ = "grpc._channel"

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as e:
            return e

    down = "Fail connecting to server on h:1, illegal connection params or server unavailable"
    # an unreachable, restarting or slow Milvus: retried
    assert transient(chained(MilvusException(2, down), RpcError("UNAVAILABLE")))
    assert transient(MilvusException(101, "collection not loaded")) and transient(RpcError("DEADLINE_EXCEEDED"))
    assert transient(MilvusException(1, "unexpected error")) and transient(RpcError("UNAVAILABLE"))
    # a refused token (pymilvus hides gRPC's answer in the cause), a dropped collection, a bad request
    assert not transient(chained(MilvusException(2, down), RpcError("UNAUTHENTICATED")))
    assert not transient(MilvusException(100, "collection not found[collection=c]"))
    assert not transient(MilvusException(1100, "invalid parameter")) and not transient(ParamError(message="bad"))
    assert not transient(RpcError("PERMISSION_DENIED"))


def test_a_redis_connection_closed_under_a_writer_is_retried_and_a_bug_of_ours_is_not():
    """A cluster failover closes a node's connections while tasks still write on them; redis-py's
    writer then finds the stream gone. That error, raised inside redis-py, is retried; the same
    error raised by our code, even when redis-py called it, is a bug and propagates."""
    from redis.asyncio.connection import Connection
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    async def write_on_a_closed_connection() -> BaseException:
        try:
            await Connection()._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])  # as after disconnect()
        except AttributeError as exc:
            return exc
        raise AssertionError("a closed connection wrote")

    race = asyncio.run(write_on_a_closed_connection())
    assert "NoneType" in str(race) and "writelines" in str(race)
    assert transient(race)

    def ours() -> None:
        stream = None
        stream.writelines([b"x"])  # type: ignore[attr-defined]

    with pytest.raises(AttributeError) as direct:
        ours()
    assert not transient(direct.value)

    async def ours_under_redis() -> BaseException:
        async def do():
            ours()
        try:
            await Retry(NoBackoff(), 0).call_with_retry(do, lambda _e: None)
        except AttributeError as exc:
            return exc
        raise AssertionError("no error")

    called_back = asyncio.run(ours_under_redis())
    assert "NoneType" in str(called_back) and not transient(called_back)
    assert not transient(AttributeError("'dict' object has no attribute 'x'"))
