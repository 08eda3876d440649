"""CPU time of the stack's processes, from Linux ``/proc``: where a run's CPU went, part by part,
and what that allows on the machine's cores."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Mapping, Optional


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _table(proc: Path) -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds: user + system, its own and its waited-for children's)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
        out[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return out


def cpu_seconds(trees: Mapping[str, int], alone: Optional[Mapping[str, int]] = None,
                proc: Path = Path("/proc")) -> Optional[dict[str, float]]:
    """CPU seconds used so far by each process of ``trees`` with every process below it, and by
    each of ``alone`` by itself; a name whose process is gone counts 0. None where ``proc`` cannot
    be read (not Linux)."""
    try:
        table = _table(proc)
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out: dict[str, float] = {}
    for name, root in trees.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in table:
                total += table[pid][1]
                todo.extend(children.get(pid, ()))
        out[name] = total
    for name, pid in (alone or {}).items():
        out[name] = table[pid][1] if pid in table else 0.0
    return out


def cpu_per_event(before: Optional[dict[str, float]], after: Optional[dict[str, float]], events: int,
                  wall_s: float, cores: int) -> Optional[dict[str, float]]:
    """Milliseconds of CPU per event of each part between two :func:`cpu_seconds` samples, their
    ``total``, ``cores_busy`` (the total over the wall time) and ``events_per_s_all_cores``: the
    rate at which this CPU per event would keep all ``cores`` busy, a bound on the throughput."""
    if before is None or after is None or events <= 0:
        return None
    used = {name: max(0.0, after[name] - before.get(name, 0.0)) for name in after}
    total = sum(used.values())
    out = {name: round(1e3 * s / events, 3) for name, s in used.items()}
    out["total"] = round(1e3 * total / events, 3)
    out["cores_busy"] = round(total / max(wall_s, 1e-9), 2)
    out["events_per_s_all_cores"] = round(events * cores / total, 1) if total > 0 else None
    return out


def meter(trees: Mapping[str, int], own: str) -> Callable[[int], Optional[dict[str, float]]]:
    """Start counting the CPU of ``trees`` and of this process (named ``own``); the function
    returned gives :func:`cpu_per_event` from now until it is called, for that many events."""
    alone = {own: os.getpid()}
    before, started = cpu_seconds(trees, alone), time.monotonic()
    return lambda events: cpu_per_event(before, cpu_seconds(trees, alone), events, time.monotonic() - started, cores())


__all__ = ["cores", "cpu_seconds", "cpu_per_event", "meter"]
