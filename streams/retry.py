"""Retry with backoff, as an object passed in rather than loops written at each call site."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Optional, TypeVar

T = TypeVar("T")

def transient(exc: BaseException) -> bool:
    """Errors of an unavailable service or a concurrent writer: worth retrying. Others propagate."""
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if getattr(exc, "retriable", False):  # Kafka client errors mark themselves
        return True
    name = type(exc).__name__
    module = type(exc).__module__
    if module.startswith(("pymilvus", "grpc")):
        return not milvus_permanent(exc)
    if module.startswith("redis") and name in ("ConnectionError", "TimeoutError", "BusyLoadingError",
                                               "TryAgainError", "ClusterDownError"):
        return True
    return name == "ConflictError" or redis_connection_race(exc)


def redis_connection_race(exc: BaseException) -> bool:
    """redis-py's asyncio client raised on a connection that a concurrent task had just closed.

    While a Redis Cluster fails over, the cluster client closes the connections of a node that is
    gone while other tasks are still writing on them; the writer then finds the connection's
    stream gone (``'NoneType' object has no attribute 'writelines'``, redis-py issues #3546 and
    #3835). The closed connection is opened again on the next try, so the call is worth retrying.
    Only an ``AttributeError`` or ``TypeError`` about ``None`` raised inside redis-py's asyncio
    client counts: the same error in our code is a bug, and propagates.
    """
    if not isinstance(exc, (AttributeError, TypeError)) or "NoneType" not in str(exc):
        return False
    redis = sys.modules.get("redis")
    if redis is None or redis.__file__ is None:
        return False
    client = os.path.join(os.path.dirname(redis.__file__), "asyncio") + os.sep
    library = (os.path.dirname(redis.__file__) + os.sep, os.path.dirname(asyncio.__file__) + os.sep)
    inside = False  # from redis-py's asyncio client down, only redis-py's frames and asyncio's
    tb = exc.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if path.startswith(client):
            inside = True
        elif inside and not path.startswith(library):
            return False
        tb = tb.tb_next
    return inside


#: Milvus answers that no retry changes: collection not found (100), invalid parameter (1100),
#: not authenticated or not allowed (1800, 1801); pymilvus's own checks of what it was given.
MILVUS_PERMANENT_CODES = frozenset({100, 1100, 1800, 1801})
PYMILVUS_PERMANENT = frozenset({"ParamError", "DataTypeNotMatchException", "DataNotMatchException",
                                "PrimaryKeyException", "FieldsTypeException", "FieldTypeException",
                                "AutoIDException", "InvalidConsistencyLevel", "UpsertAutoIDTrueException"})


def error_chain(exc: Optional[BaseException]) -> Iterator[BaseException]:
    """``exc`` and its causes (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def error_code(exc: BaseException) -> Any:
    """An error's ``code``: Milvus's number, or gRPC's status (``code()``, a method there)."""
    code = getattr(exc, "code", None)
    try:
        return code() if callable(code) else code
    except Exception:  # noqa: BLE001
        return None


def milvus_permanent(exc: BaseException) -> bool:
    """A pymilvus or gRPC error that no retry fixes: a refused token or privilege (anywhere in its
    chain), a missing collection, an invalid request. An unreachable or restarting Milvus, a
    timeout, a released collection are transient."""
    for e in error_chain(exc):
        code = error_code(e)
        if getattr(code, "name", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
            return True
        if isinstance(code, int) and code in MILVUS_PERMANENT_CODES:
            return True
        if type(e).__name__ in PYMILVUS_PERMANENT:
            return True
    return False


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: ``min(cap, base * 2**attempt) * U(0.5, 1)``."""

    base_s: float = 0.1
    cap_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.cap_s, self.base_s * (2 ** attempt)) * random.uniform(0.5, 1.0)


async def retry_forever(fn: Callable[[], Awaitable[T]], backoff: Backoff, *, what: str,
                        log: Optional[logging.Logger] = None,
                        is_transient: Callable[[BaseException], bool] = transient,
                        on_retry: Optional[Callable[[str], None]] = None) -> T:
    """Await ``fn()`` until it succeeds, waiting ``backoff`` between tries of transient errors
    (each logged, and told to ``on_retry(what)``, e.g. a metric); tenacity runs the loop.

    A batch is never acked before its side effects are done, so waiting for a service to come
    back is the right thing to do; a non-transient error propagates.
    """
    from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if log is not None:
            log.warning("%s failed (%s: %s); retry %d in %.2f s", what, type(exc).__name__, exc,
                        state.attempt_number, state.upcoming_sleep)
        if on_retry is not None:
            on_retry(what)

    async for attempt in AsyncRetrying(retry=retry_if_exception(is_transient), reraise=True,
                                       wait=lambda state: backoff.delay(state.attempt_number - 1),
                                       before_sleep=before_sleep):
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity retries until success or re-raises")  # pragma: no cover
