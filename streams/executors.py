"""An executor of one thread whose queued calls run by priority, for the encoder: a batch's own
texts go before texts encoded ahead for a batch after it."""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable, Optional

NOW, LATER = 0, 1  # priorities: what a running batch waits for; work done ahead


class PriorityExecutor(Executor):
    """Runs calls one at a time on its own thread: the lowest priority number first, calls of the
    same priority in the order submitted. A call already running is never interrupted. ``submit``
    runs at :data:`NOW`, so the executor serves ``loop.run_in_executor`` as is."""

    def __init__(self, thread_name: str = "priority") -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._name = thread_name

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        return self.submit_at(NOW, fn, *args, **kwargs)

    def submit_at(self, priority: int, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)`` at ``priority``; its future can be cancelled until it runs."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            self._queue.put((priority, next(self._order), future, fn, args, kwargs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn, args, kwargs = self._queue.get()
            if future is None:  # shut down: everything queued before it has run
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        queued = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    queued[2].cancel()
            self._queue.put((float("inf"), next(self._order), None, None, (), {}))
            thread = self._thread
        if wait and thread is not None:
            thread.join()
