"""The encoder's executor: one thread, a running batch's calls before those done ahead."""

import threading

import pytest

from streams.executors import LATER, NOW, PriorityExecutor


def _blocked(ex: PriorityExecutor) -> threading.Event:
    """Occupy the executor's thread until the returned event is set."""
    started, release = threading.Event(), threading.Event()
    ex.submit(lambda: started.set() or release.wait(10))
    assert started.wait(10)
    return release


def test_calls_run_by_priority_then_in_order_on_one_thread():
    ex = PriorityExecutor("test-priority")
    ran: list[tuple[str, str]] = []
    release = _blocked(ex)
    futures = [ex.submit_at(LATER, lambda n=n: ran.append((n, threading.current_thread().name)) or n)
               for n in ("later-1", "later-2")]
    futures += [ex.submit(lambda: ran.append(("now-1", threading.current_thread().name)) or "now-1"),
                ex.submit_at(NOW, lambda: ran.append(("now-2", threading.current_thread().name)) or "now-2")]
    release.set()
    assert [f.result(10) for f in futures] == ["later-1", "later-2", "now-1", "now-2"]
    assert [n for n, _ in ran] == ["now-1", "now-2", "later-1", "later-2"]
    assert {t for _, t in ran} == {"test-priority"}
    ex.shutdown()


def test_a_cancelled_call_never_runs_and_errors_reach_the_caller():
    ex = PriorityExecutor()
    ran: list[int] = []
    release = _blocked(ex)
    dropped = ex.submit_at(LATER, ran.append, 1)
    assert dropped.cancel()
    failing = ex.submit(lambda: 1 / 0)
    kept = ex.submit_at(LATER, ran.append, 2)
    release.set()
    assert kept.result(10) is None and ran == [2]
    with pytest.raises(ZeroDivisionError):
        failing.result(10)
    ex.shutdown()


def test_shutdown_cancels_what_is_queued_when_asked_and_refuses_new_calls():
    ex = PriorityExecutor()
    release = _blocked(ex)
    queued = ex.submit_at(LATER, lambda: "late")
    kept = PriorityExecutor()
    kept_release = _blocked(kept)
    kept_queued = kept.submit(lambda: "done")
    ex.shutdown(wait=False, cancel_futures=True)
    kept.shutdown(wait=False)
    release.set()
    kept_release.set()
    assert queued.cancelled()
    assert kept_queued.result(10) == "done"  # without cancel_futures, what is queued still runs
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(lambda: None)
