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


def test_backoff_grows_to_its_cap():
    b = Backoff(base_s=0.1, cap_s=1.0)
    assert 0.05 <= b.delay(0) <= 0.1 and 0.5 <= b.delay(10) <= 1.0
