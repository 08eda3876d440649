"""What the reliability tests measure and how: the audit of a stream against Redis and the output
topic, a steady producer, restartable private servers, and the session's report
(``reliability-report.json`` and a short text beside it, in ``STREAMREC_REPORT_DIR``, default
``reports/``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from workers.runner import encode_line
from workers.stack import free_port, port_open, redis_server_bin, wait_for

FIELDS = ("events_sent", "applied_once", "lost", "applied_twice", "kills", "rebalances", "outages",
          "bad_inputs_tried", "dead_lettered", "crashes")
ROOT = Path(__file__).resolve().parents[2]


def report_dir() -> Path:
    folder = Path(os.environ.get("STREAMREC_REPORT_DIR") or "reports")
    return folder if folder.is_absolute() else ROOT / folder


class ReliabilityReport:
    """Figures per broker, summed over the scenarios that ran on it, each scenario kept too."""

    def __init__(self) -> None:
        self.brokers: dict[str, dict] = {}

    def add(self, broker: str, scenario: str, figures: dict) -> None:
        entry = self.brokers.setdefault(broker, {"broker": broker, **{f: 0 for f in FIELDS}, "scenarios": []})
        for f in FIELDS:
            entry[f] += int(figures.get(f, 0))
        entry["scenarios"].append({"scenario": scenario, **figures})

    def skipped(self, broker: str, reason: str) -> None:
        self.brokers.setdefault(broker, {"broker": broker, **{f: 0 for f in FIELDS}, "scenarios": []})
        self.brokers[broker]["skipped"] = reason

    def write(self, folder: Path) -> Optional[Path]:
        if not self.brokers:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "reliability-report.json"
        entries = list(self.brokers.values())
        path.write_text(json.dumps({"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "brokers": entries}, indent=2) + "\n")
        (folder / "reliability-report.txt").write_text(self.text())
        return path

    def text(self) -> str:
        lines = ["streamrec reliability report", ""]
        for e in self.brokers.values():
            lines.append(f"{e['broker']}: " + ", ".join(f"{f.replace('_', ' ')} {e[f]:,}" for f in FIELDS))
            if e.get("skipped"):
                lines.append(f"  skipped: {e['skipped']}")
            for s in e["scenarios"]:
                shown = ", ".join(f"{k.replace('_', ' ')} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                  for k, v in s.items() if k != "scenario" and not isinstance(v, (dict, list)))
                lines.append(f"  {s['scenario']}: {shown}")
        return "\n".join(lines) + "\n"


# -- the audit --------------------------------------------------------------------------------------

def user_keys(prefix: str, user_id: str) -> tuple[str, str]:
    """The profile hash and the applied-event-ids zset of a user (as the Redis profile store keeps them)."""
    base = f"{prefix}:{{u:{user_id}}}"
    return base + ":p", base + ":ev"


def applications(r, prefix: str, users: Iterable[str]) -> int:
    """Events applied so far to ``users`` (each application counted, a repeated one too)."""
    users = list(users)
    pipe = r.pipeline(transaction=False)
    for u in users:
        pipe.hget(user_keys(prefix, u)[0], "evseq")
    return sum(int(v or 0) for v in pipe.execute())


def audit(r, prefix: str, events: list[dict], answers: dict[str, int]) -> dict:
    """Every event against what Redis holds and what the output topic has.

    Per user, the applied-events zset holds each applied event id once, the profile's ``evseq``
    counts every application, and the profile's own click and query counters count every event
    the model applied; an event applied twice shows as either count exceeding the set's size.
    ``answers`` maps a trigger event id to the number of lists seen for it."""
    by_user: dict[str, list[str]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e["event_id"])
    pipe = r.pipeline(transaction=False)
    for u in by_user:
        p, ev = user_keys(prefix, u)
        pipe.zrange(ev, 0, -1)
        pipe.hget(p, "evseq")
        pipe.hget(p, "meta")
    rows = pipe.execute()
    out = {"events_sent": len(events), "applied_once": 0, "lost": 0, "applied_twice": 0, "applied_unsent": 0}
    for i, (u, sent_ids) in enumerate(by_user.items()):
        ids = {x.decode() for x in rows[3 * i]}
        seq = int(rows[3 * i + 1] or 0)
        meta = json.loads(rows[3 * i + 2]) if rows[3 * i + 2] else {"clicks": 0, "queries": 0}
        sent = set(sent_ids)
        assert len(sent) == len(sent_ids), f"event ids of {u} repeat in the input"
        twice = max(seq - len(ids), meta["clicks"] + meta["queries"] - len(ids), 0)
        applied = len(sent & ids)
        out["lost"] += len(sent - ids)
        out["applied_unsent"] += len(ids - sent)
        out["applied_twice"] += twice
        out["applied_once"] += applied - min(twice, applied)
    out["answered"] = sum(1 for e in events if answers.get(e["event_id"], 0) > 0)
    out["unanswered"] = len(events) - out["answered"]
    out["republished"] = sum(max(n - 1, 0) for n in answers.values())
    return out


def count_answers(log, topic: str, want: set[str], timeout_s: float, alive: Callable[[], bool]) -> dict[str, int]:
    """Lists per trigger id on ``topic``, read until every id in ``want`` has one (or the deadline)."""
    counts: dict[str, int] = {}
    missing = set(want)
    for batch in log.tail(topic, timeout_s=timeout_s):
        for rec in batch:
            tid = json.loads(rec.value)["trigger_event_id"]
            counts[tid] = counts.get(tid, 0) + 1
            missing.discard(tid)
        if not missing or not alive():
            break
    return counts


def crashes_in(log_text: str) -> int:
    """Agent and service crashes a worker logged (an agent that dies may leave the process up);
    tracebacks that clients log while they retry are not crashes."""
    return len(re.findall(r"Crashed reason=", log_text))


# -- a producer that keeps a window of events in flight ----------------------------------------------

@dataclass
class Stream:
    """Publishes ``events`` to the harness's events topic in chunks, keeping at most ``window``
    unapplied, and runs ``hooks`` (progress threshold -> action) as progress passes them.
    Progress is the number of applications Redis has recorded for the events' users."""

    h: object  # a tests.integration.conftest.Harness; its worker may be replaced by a hook
    events: list[dict]
    hooks: list[tuple[int, Callable[[], None]]] = field(default_factory=list)
    window: int = 96
    chunk: int = 16

    def progress(self) -> int:
        return applications(self.h.redis, self.h.prefix, {e["user_id"] for e in self.events})

    def run(self, timeout_s: float = 400) -> None:
        hooks = sorted(self.hooks, key=lambda h: h[0])
        sent = 0
        deadline = time.monotonic() + timeout_s
        while True:
            done = self.progress()
            if sent < len(self.events) and sent - done < self.window:
                part = self.events[sent:sent + self.chunk]
                self.h.log.publish(self.h.settings.topic_events, [(*encode_line(e), None) for e in part])
                sent += len(part)
                continue
            # faults come with the window full: events are in flight when a server or worker goes
            if hooks and done >= hooks[0][0]:
                hooks.pop(0)[1]()
                continue
            if sent >= len(self.events) and done >= len(self.events) and not hooks:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{done} of {len(self.events)} events applied after {timeout_s:.0f} s "
                                   f"({len(hooks)} planned faults left)")
            worker = self.h.worker
            try:  # until the worker applies more; fails at once if it exits
                wait_for(lambda done=done: self.progress() > done, "progress", min(left, 5.0), worker.proc, worker.log_path)
            except TimeoutError:
                pass  # no progress in 5 s: check hooks and the overall deadline again


# -- private servers that a test may stop and start again ------------------------------------------

class Restartable:
    """A child server on a fixed port that a test can crash (SIGKILL) or stop and start again."""

    name = "server"

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.base / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return port_open(self.port)

    def start(self, timeout_s: float = 90.0):
        self.proc = subprocess.Popen(self.argv(), stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.ready, self.name, timeout_s, self.proc, self.log)
        return self

    def down(self, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.down(signal.SIGTERM)


class DurableRedis(Restartable):
    """redis-server with an append-only file synced on every write: a crash loses nothing it
    acknowledged, as a production Redis holding profiles would be configured."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [redis_server_bin(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.base),
                "--appendonly", "yes", "--appendfsync", "always", "--save", ""]

    def ready(self) -> bool:
        import redis

        r = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return bool(r.ping())
        finally:
            r.close()


class MilvusServer(Restartable):
    """A Milvus Lite server of its own, on its own data folder."""

    name = "milvus"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.base / "data"),
                "--host", "127.0.0.1", "--port", str(self.port)]

    def ready(self) -> bool:
        from streams.stores.milvus_items import milvus_client

        if not port_open(self.port):  # before a client, which logs every refused connection
            return False
        c = milvus_client(self.uri, timeout=3)
        try:
            c.get_server_version()
            return True
        finally:
            c.close()



class GroupsUndescribed(RuntimeError):
    """The broker's answer to DescribeGroups cannot be read (Tansu's, by kafka-python)."""


def group_assignment(bootstrap: str, group: str, topic: str) -> Optional[dict[str, list[int]]]:
    """Partitions of ``topic`` per member of the consumer group, once the group is stable (``None``
    while it rebalances); raises :class:`GroupsUndescribed` where the broker's answer is unreadable."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=[bootstrap], request_timeout_ms=5000)
    try:
        g = admin.describe_groups([group])[group]
    except ValueError as exc:
        raise GroupsUndescribed(str(exc)) from exc
    finally:
        admin.close()
    if g.get("group_state") != "Stable":
        return None
    return {m["member_id"]: sorted(p for a in (m.get("member_assignment") or {}).get("assigned_partitions", [])
                                   if a["topic"] == topic for p in a["partitions"])
            for m in g.get("members", [])}


def wait_members(bootstrap: str, group: str, topic: str, n: int, timeout_s: float = 120) -> object:
    """Wait until the group is stable with ``n`` members, each owning partitions of ``topic``;
    returns the partition counts per member, or why the broker could not say."""
    try:
        group_assignment(bootstrap, group, topic)
    except GroupsUndescribed as exc:
        return f"not described by this broker ({exc})"
    got: dict = {}

    def settled() -> bool:
        got["now"] = group_assignment(bootstrap, group, topic)
        return got["now"] is not None and len(got["now"]) == n and all(got["now"].values())

    wait_for(settled, f"group {group} stable with {n} members", timeout_s)
    return sorted(len(p) for p in got["now"].values())
