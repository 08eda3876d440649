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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from models.params import ModelParams
from models.profile import Applied, Profile
from streams.stores import codec
from streams.stores.redis_profiles import read_stats
from workers.runner import encode_line
from workers.stack import free_port, index_server_argv, index_server_env, port_open, redis_server_bin, wait_for

FIELDS = ("events_sent", "applied_once", "lost", "applied_twice", "counters_off_by", "kills", "rebalances", "outages",
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

    def merge(self, other: "ReliabilityReport") -> None:
        """Add another process's figures (``make test`` runs the suite in several)."""
        for broker, e in other.brokers.items():
            for s in e["scenarios"]:
                self.add(broker, s["scenario"], {k: v for k, v in s.items() if k != "scenario"})
            if e.get("skipped"):
                self.skipped(broker, e["skipped"])

    @classmethod
    def read(cls, path: Path) -> "ReliabilityReport":
        report = cls()
        report.brokers = {e["broker"]: e for e in json.loads(path.read_text())["brokers"]}
        return report

    def write(self, folder: Path, part: Optional[str] = None) -> Optional[Path]:
        """``reliability-report.json`` and ``.txt``; with ``part`` (a test process of several),
        ``reliability-report.<part>.part.json`` for :func:`merge_parts` to join."""
        if not self.brokers:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        entries = list(self.brokers.values())
        body = json.dumps({"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "brokers": entries},
                          indent=2) + "\n"
        if part is not None:
            path = folder / f"reliability-report.{part}.part.json"
            path.write_text(body)
            return path
        path = folder / "reliability-report.json"
        path.write_text(body)
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


def clear_parts(folder: Path) -> None:
    for part in folder.glob("reliability-report.*.part.json"):
        part.unlink()


def merge_parts(folder: Path) -> Optional[ReliabilityReport]:
    """Join the parts the test processes wrote into one report, written as usual; None if none."""
    parts = sorted(folder.glob("reliability-report.*.part.json"))
    if not parts:
        return None
    report = ReliabilityReport()
    for part in parts:
        report.merge(ReliabilityReport.read(part))
        part.unlink()
    report.write(folder)
    return report


# -- the audit --------------------------------------------------------------------------------------

def profiles(r, prefix: str, users: Iterable[str]) -> dict[str, Optional[Profile]]:
    """The stored profile of each of ``users`` (``None`` where there is none), as the Redis
    profile store keeps it: one record per user."""
    users = list(users)
    pipe = r.pipeline(transaction=False)
    for u in users:
        pipe.get(f"{prefix}:{{u:{u}}}")
    return {u: codec.decode(u, raw)[0] if raw else None for u, raw in zip(users, pipe.execute())}


def expected_counters(events: list[dict], params: ModelParams = ModelParams()) -> dict[str, int]:
    """Per-item effects that the events should have made, counted the way the pipeline makes them:
    each click adds one to its item's clicks, and a co-click each way and a step to it from each
    distinct other item among the user's last ``cooccur_window`` clicks in a history of
    ``history_size`` events."""
    history: dict[str, list[tuple[str, str]]] = {}
    clicks = pairs = steps = 0
    for e in events:
        h = history.setdefault(e["user_id"], [])
        if e["type"] == "forget":
            h.clear()
            continue
        if e["type"] == "click":
            earlier = [i for kind, i in h if kind == "click"][-params.cooccur_window:]
            clicks += 1
            pairs += 2 * len(set(earlier) - {e["item_id"]})
            steps += len(set(earlier) - {e["item_id"]})
        h.append((e["type"], e.get("item_id", "")))
        del h[: max(0, len(h) - params.history_size)]
    return {"clicks": clicks, "pairs": pairs, "steps": steps}


def audit(r, prefix: str, events: list[dict], answers: dict[str, int], shards: int = 16) -> dict:
    """Every event against what Redis holds and what the output topic has.

    Per user, the stored profile counts the events it took in since its last forget and sums
    their id hashes (``Applied``), and counts clicks and queries on its own; an event lost or
    applied twice moves the count or the sum away from what the sent events give. Per-item state
    is audited by the totals of applied clicks, co-clicks and steps that the shards keep beside their
    counters (``counters_off_by``: how far they are from what the events should give).
    ``answers`` maps a trigger event id to its lists (:func:`count_answers`). An event whose
    batch ran again after its list was out gets it again: marked ``duplicate`` when its state had
    been written (made from the state now), else unmarked and, from the same state, the same
    list; ``lists_differing`` counts events whose unmarked lists differ, and
    ``duplicate_first`` those whose first list is marked (a list never out before)."""
    by_user: dict[str, list[dict]] = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e)
    stored = profiles(r, prefix, by_user)
    out = {"events_sent": len(events), "applied_once": 0, "lost": 0, "applied_twice": 0}
    for u, evs in by_user.items():
        ids = [e["event_id"] for e in evs]
        assert len(set(ids)) == len(ids), f"event ids of {u} repeat in the input"
        last_forget = max((i for i, e in enumerate(evs) if e["type"] == "forget"), default=0)
        since = evs[last_forget:]  # a forget starts the count again, itself included
        n, digest = Applied.expected([e["event_id"] for e in since])
        p = stored[u]
        count = p.applied.count if p else 0
        model = (p.clicks + p.queries) if p else 0
        want_model = sum(e["type"] in ("click", "query") for e in since)
        twice = max(count - n, model - want_model, 0)
        lost = max(n - count, 0)
        if count == n and p is not None and p.applied.digest != digest:  # as many, but not the same ones
            lost, twice = lost + 1, twice + 1
        out["lost"] += lost
        out["applied_twice"] += twice
        out["applied_once"] += len(evs) - lost - twice if lost or twice else len(evs)
    pipe = r.pipeline(transaction=False)
    for k in range(shards):
        pipe.hmget(f"{prefix}:{{s:{k}}}:m", ["clicks", "pairs", "steps"])
    got = {"clicks": 0, "pairs": 0, "steps": 0}
    for row in pipe.execute():
        for name, v in zip(("clicks", "pairs", "steps"), row):
            got[name] += int(v or 0)
    want = expected_counters(events)
    out["counters"] = {"clicks": [got["clicks"], want["clicks"]], "co_clicks": [got["pairs"], want["pairs"]],
                       "steps": [got["steps"], want["steps"]]}
    out["counters_off_by"] = sum(abs(got[name] - want[name]) for name in ("clicks", "pairs", "steps"))
    out["answered"] = sum(1 for e in events if answers.get(e["event_id"]) or e["type"] == "forget")
    out["unanswered"] = len(events) - out["answered"]
    out["republished"] = sum(max(len(ls) - 1, 0) for ls in answers.values())
    out["republished_marked_duplicate"] = sum(dup for ls in answers.values() for dup, _ in ls)
    out["lists_differing"] = sum(len({items for dup, items in ls if not dup}) > 1 for ls in answers.values())
    out["duplicate_first"] = sum(ls[0][0] for ls in answers.values() if ls)
    return out


def count_answers(log, topic: str, want: set[str], timeout_s: float,
                  alive: Callable[[], bool]) -> dict[str, list[tuple[bool, tuple[str, ...]]]]:
    """The lists on ``topic`` by trigger id, in the order published, each as (marked duplicate,
    item ids); read until every id in ``want`` has one (or the deadline)."""
    lists: dict[str, list[tuple[bool, tuple[str, ...]]]] = {}
    missing = set(want)
    for batch in log.tail(topic, timeout_s=timeout_s):
        for rec in batch:
            msg = json.loads(rec.value)
            tid = msg["trigger_event_id"]
            lists.setdefault(tid, []).append((bool(msg["duplicate"]), tuple(i["item_id"] for i in msg["items"])))
            missing.discard(tid)
        if not missing or not alive():
            break
    return lists


def crashes_in(log_text: str) -> int:
    """Agent and service crashes a worker logged (an agent that dies may leave the process up);
    tracebacks that clients log while they retry are not crashes."""
    return len(re.findall(r"Crashed reason=", log_text))


# -- a producer that keeps a window of events in flight ----------------------------------------------

@dataclass
class Stream:
    """Publishes ``events`` to the harness's events topic in chunks, keeping at most ``window``
    unapplied, and runs ``hooks`` (progress threshold -> action) as progress passes them.
    Progress is the number of events applied (stats count each once)."""

    h: object  # a tests.integration.conftest.Harness; its worker may be replaced by a hook
    events: list[dict]
    hooks: list[tuple[int, Callable[[], None]]] = field(default_factory=list)
    window: int = 96
    chunk: int = 16

    def progress(self) -> int:
        stats = read_stats(self.h.redis, self.h.prefix, self.h.settings.state_shards)
        return stats["events_applied"] + stats["users_forgotten"]

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

    def env(self) -> dict[str, str]:
        return {}

    def ready(self) -> bool:
        return port_open(self.port)

    def start(self, timeout_s: float = 90.0):
        self.proc = subprocess.Popen(self.argv(), stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **self.env()},
                                     start_new_session=True)
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
        return index_server_argv(self.base / "data", self.port)

    def env(self) -> dict[str, str]:
        return index_server_env()

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
