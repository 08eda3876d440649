"""CPU time by process (workers.cpu), read from /proc for real processes."""

import select
import subprocess
import sys
import time

import pytest

from workers.cpu import cpu_per_event, cpu_seconds, meter

# Spends at least 0.3 s of CPU, says so, then waits on stdin (alive until the test closes it).
BURN = ("import sys, time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "print('burnt', flush=True); sys.stdin.read()\n")
# Starts BURN as its child, waits for its line, says so, then waits on stdin.
PARENT = ("import subprocess, sys\n"
          f"child = subprocess.Popen([sys.executable, '-c', {BURN!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
          "child.stdout.readline()\n"
          "print(child.pid, flush=True); sys.stdin.read(); child.stdin.close(); child.wait()\n")


def _line(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "the process said nothing before the deadline"
    return proc.stdout.readline().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")
def test_a_tree_counts_the_processes_below_its_root_and_alone_only_the_process():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(_line(parent))
        got = cpu_seconds({"tree": parent.pid, "gone": 2 ** 22 + 7}, {"alone": parent.pid, "child": child})
        assert got["child"] >= 0.3  # its burn
        assert got["tree"] >= got["alone"] + got["child"] - 1e-9  # the parent and its child
        assert got["alone"] < got["child"]  # the parent only started a process and waited
        assert got["gone"] == 0.0
    finally:
        parent.stdin.close()
        parent.wait(timeout=60)


def test_no_proc_folder_measures_nothing(tmp_path):
    assert cpu_seconds({"x": 1}, proc=tmp_path / "missing") is None


def test_cpu_per_event_is_each_part_per_event_and_the_rate_that_keeps_every_core_busy():
    got = cpu_per_event({"worker": 1.0, "redis": 2.0}, {"worker": 2.0, "redis": 2.5}, events=500, wall_s=1.0, cores=2)
    assert got == {"worker": 2.0, "redis": 1.0, "total": 3.0, "cores_busy": 1.5, "events_per_s_all_cores": 666.7}
    assert cpu_per_event(None, {"worker": 1.0}, 10, 1.0, 2) is None
    assert cpu_per_event({"worker": 1.0}, {"worker": 1.0}, 10, 1.0, 2)["events_per_s_all_cores"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")
def test_a_meter_counts_this_process_from_when_it_started():
    per_event = meter({}, "me")
    t = time.process_time()
    while time.process_time() - t < 0.2:  # 0.2 s of CPU after the meter started
        pass
    got = per_event(10)
    assert got["me"] >= 19.0 and got["total"] == got["me"]  # 20 ms an event, less one clock tick
