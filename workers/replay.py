"""Recording topics to a file and replaying them.

A recording is gzipped JSONL: a header line, then one line per message with its topic,
partition, offset, timestamp (ms), key, value and headers (bytes as base64). Messages are
written partition by partition merged by timestamp, so each partition's (and so each key's)
order is kept. Replay publishes them in file order, keyed as recorded, with their recorded
timestamps, as fast as possible or at N times the recorded pace, and can resume: a state file
counts what the broker has confirmed, so a restarted replay skips it. A crash between a
confirmed send and the state update re-sends at most one chunk, which the worker's
idempotency makes harmless.
"""

from __future__ import annotations

import base64
import gzip
import heapq
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

FORMAT = "streamrec.recording.v1"


@dataclass
class Recorded:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: Optional[bytes]
    value: Optional[bytes]
    headers: list[tuple[str, bytes]]

    def to_json(self) -> dict:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "timestamp_ms": self.timestamp_ms, "key_b64": _b64(self.key), "value_b64": _b64(self.value),
                "headers": [[k, _b64(v)] for k, v in self.headers]}

    @classmethod
    def from_json(cls, d: dict) -> "Recorded":
        return cls(d["topic"], d["partition"], d["offset"], d["timestamp_ms"], _unb64(d["key_b64"]),
                   _unb64(d["value_b64"]), [(k, _unb64(v) or b"") for k, v in d.get("headers", [])])


def _b64(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else base64.b64decode(s)


def parse_time(text: str) -> float:
    """Unix seconds from ``1700000000`` or an ISO-8601 time (UTC when no zone is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def record(bootstrap: str, topics: Sequence[str], out: Path, *, start: str = "earliest", end: str = "now",
           timeout_s: float = 600.0, progress: bool = True, kafka_options: Optional[dict] = None) -> int:
    """Copy ``topics`` to ``out``; returns the number of messages written.

    Args:
        kafka_options: further kafka-python client arguments (security, see
            :func:`streams.security.kafka_client_options`).
        start: ``earliest``, a time (Unix seconds or ISO-8601), or per-partition offsets
            ``P=OFFSET,...`` (for every topic; ``TOPIC/P=OFFSET`` for one).
        end: ``now`` (what the topics hold when recording starts), ``count:N``, or a time.
        timeout_s: give up (with an error) if ``end`` is not reached by then.
    """
    from kafka import KafkaConsumer, TopicPartition
    from tqdm import tqdm

    consumer = KafkaConsumer(bootstrap_servers=[h.strip() for h in bootstrap.split(",")], group_id=None,
                             enable_auto_commit=False, fetch_max_wait_ms=100, client_id="streamrec-record",
                             **(kafka_options or {}))
    try:
        tps = []
        for t in topics:
            parts = _partitions(consumer, t, timeout_s)
            tps += [TopicPartition(t, p) for p in sorted(parts)]
        consumer.assign(tps)
        _seek(consumer, tps, start)
        # a time start is also checked per message: some brokers (Tansu) answer the offsets-by-time
        # lookup wrongly, and the check makes the result the same on every broker
        from_ms = None if start == "earliest" or "=" in start else parse_time(start) * 1000
        limit = int(end.split(":", 1)[1]) if end.startswith("count:") else None
        until_ms = None if end == "now" or limit is not None else parse_time(end) * 1000
        per_partition: dict = {tp: [] for tp in tps}
        targets: dict = {}  # the high watermark of each partition when first seen: "now"
        done: set = set()
        total = 0
        deadline = time.monotonic() + timeout_s
        bar = tqdm(desc="record", unit="msg", disable=not progress, file=sys.stderr)
        while len(done) < len(tps) and (limit is None or total < limit):
            if time.monotonic() > deadline:
                raise TimeoutError(f"recording did not reach its end ({end}) within {timeout_s:.0f} s")
            polled = consumer.poll(timeout_ms=200, max_records=5000)
            for tp, rows in polled.items():
                for r in rows:
                    if tp in done or (limit is not None and total >= limit):
                        break
                    if until_ms is not None and r.timestamp > until_ms:
                        done.add(tp)
                        break
                    if from_ms is not None and r.timestamp < from_ms:
                        continue
                    per_partition[tp].append(Recorded(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value,
                                                      [(k, v) for k, v in (r.headers or [])]))
                    total += 1
                    bar.update(1)
            for tp in tps:
                if tp in done:
                    continue
                hw = consumer.highwater(tp)  # from fetch responses (correct where ListOffsets is not)
                if hw is not None and tp not in targets:
                    targets[tp] = hw
                if until_ms is None and limit is None and tp in targets and consumer.position(tp) >= targets[tp]:
                    done.add(tp)
                    consumer.pause(tp)
                elif until_ms is not None and tp in targets and consumer.position(tp) >= consumer.highwater(tp):
                    done.add(tp)  # the end time lies in the future of what the partition holds
                    consumer.pause(tp)
        bar.close()
    finally:
        consumer.close()
    rows = list(heapq.merge(*per_partition.values(), key=lambda r: r.timestamp_ms))[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"format": FORMAT, "topics": list(topics), "messages": len(rows),
                             "recorded_at": time.time(), "start": start, "end": end}) + "\n")
        for r in rows:
            fh.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")
    return len(rows)


def _partitions(consumer, topic: str, timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return parts
        consumer.poll(timeout_ms=100)
    raise ValueError(f"topic {topic!r} does not exist")


def _seek(consumer, tps: list, start: str) -> None:
    if start == "earliest":
        consumer.seek_to_beginning(*tps)
    elif "=" in start:  # P=OFFSET (every topic) or TOPIC/P=OFFSET, comma separated
        offsets = {}
        for part in start.split(","):
            where, off = part.strip().split("=")
            topic, _, p = where.rpartition("/")
            for tp in tps:
                if tp.partition == int(p) and (not topic or tp.topic == topic):
                    offsets[tp] = int(off)
        consumer.seek_to_beginning(*[tp for tp in tps if tp not in offsets])
        for tp, off in offsets.items():
            consumer.seek(tp, off)
    else:
        ms = int(parse_time(start) * 1000)
        found = consumer.offsets_for_times({tp: ms for tp in tps})
        for tp in tps:
            if found.get(tp) is None:
                consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, found[tp].offset)


def read_recording(path: Path) -> tuple[dict, Iterator[Recorded]]:
    """The header and the messages of a recording."""
    fh = gzip.open(path, "rt", encoding="utf-8")
    header = json.loads(fh.readline())
    if header.get("format") != FORMAT:
        fh.close()
        raise ValueError(f"{path} is not a streamrec recording (format {header.get('format')!r})")

    def rows() -> Iterator[Recorded]:
        with fh:
            for line in fh:
                if line.strip():
                    yield Recorded.from_json(json.loads(line))
    return header, rows()


def replay(bootstrap: str, path: Path, *, rename: Optional[dict[str, str]] = None, speed: float = 0.0,
           state: Optional[Path] = None, chunk: int = 500, progress: bool = True,
           stop_after: Optional[int] = None, topics: Optional[Sequence[str]] = None,
           kafka_options: Optional[dict] = None) -> int:
    """Publish a recording; returns the number of messages sent by this call.

    Args:
        kafka_options: further kafka-python client arguments (security).
        rename: topic names to replace (``{"old": "new"}``).
        speed: 0 for as fast as possible, else N times the recorded pace.
        state: a file counting confirmed messages; a replay with the same state file resumes.
        stop_after: stop after this many messages (an interruption, for tests and partial runs).
        topics: replay only the messages of these recorded topics (e.g. the catalog first).
    """
    from kafka import KafkaProducer
    from tqdm import tqdm

    rename = rename or {}
    header, rows = read_recording(path)
    already = int(json.loads(state.read_text())["sent"]) if state is not None and state.exists() else 0
    producer = KafkaProducer(bootstrap_servers=[h.strip() for h in bootstrap.split(",")], acks="all",
                             linger_ms=5, retries=10, max_in_flight_requests_per_connection=1,
                             enable_idempotence=False, client_id="streamrec-replay", **(kafka_options or {}))
    sent = 0
    bar = tqdm(desc="replay", unit="msg", total=header.get("messages"), initial=already, disable=not progress,
               file=sys.stderr)
    try:
        first_ts: Optional[int] = None
        started = time.monotonic()
        pending = []
        if topics is not None:
            rows = (r for r in rows if r.topic in topics)
        for n, r in enumerate(rows):
            if first_ts is None:
                first_ts = r.timestamp_ms
            if n < already:
                continue
            if stop_after is not None and sent + len(pending) >= stop_after:
                break
            if speed > 0:
                ahead = (r.timestamp_ms - first_ts) / 1000 / speed - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # pacing at the recorded rate times `speed`
            pending.append(producer.send(rename.get(r.topic, r.topic), key=r.key, value=r.value,
                                         timestamp_ms=r.timestamp_ms, headers=r.headers or None))
            if len(pending) >= chunk:
                sent += _confirm(producer, pending, state, already + sent, bar)
        sent += _confirm(producer, pending, state, already + sent, bar)
    finally:
        bar.close()
        producer.close()
    return sent


def _confirm(producer, pending: list, state: Optional[Path], before: int, bar) -> int:
    producer.flush()
    for f in pending:
        f.get(timeout=60)
    n = len(pending)
    pending.clear()
    if state is not None:
        tmp = state.with_suffix(state.suffix + ".tmp")
        tmp.write_text(json.dumps({"sent": before + n}))
        tmp.replace(state)
    bar.update(n)
    return n
