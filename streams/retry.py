"""Retry with backoff, as an object passed in rather than loops written at each call site."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, TypeVar

T = TypeVar("T")

def transient(exc: BaseException) -> bool:
    """Errors of an unavailable service or a concurrent writer: worth retrying. Others propagate."""
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if getattr(exc, "retriable", False):  # Kafka client errors mark themselves
        return True
    name = type(exc).__name__
    module = type(exc).__module__
    return (module.startswith("redis") and name in ("ConnectionError", "TimeoutError", "BusyLoadingError",
                                                     "TryAgainError", "ClusterDownError"))\
        or module.startswith("pymilvus") or module.startswith("grpc") or name == "ConflictError"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: ``min(cap, base * 2**attempt) * U(0.5, 1)``."""

    base_s: float = 0.1
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.cap_s, self.base_s * (2 ** attempt)) * random.uniform(0.5, 1.0)


async def retry_forever(fn: Callable[[], Awaitable[T]], backoff: Backoff, *, what: str,
                        log: Optional[logging.Logger] = None,
                        is_transient: Callable[[BaseException], bool] = transient) -> T:
    """Await ``fn()`` until it succeeds, waiting ``backoff`` between tries of transient errors.

    A batch is never acked before its side effects are done, so waiting for a service to come
    back is the right thing to do; a non-transient error propagates.
    """
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as exc:  # noqa: BLE001 - sorted by is_transient
            if not is_transient(exc):
                raise
            wait = backoff.delay(attempt)
            if log is not None:
                log.warning("%s failed (%s: %s); retry %d in %.2f s", what, type(exc).__name__, exc, attempt + 1, wait)
            attempt += 1
            await asyncio.sleep(wait)
