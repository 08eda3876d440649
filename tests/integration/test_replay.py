"""Record and replay on a real broker: exact copies, per-key order, resumable without duplicates."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import uuid

import pytest

from streams.stores.eventlog import KafkaEventLog
from workers.replay import read_recording, record, replay

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.every_broker]


@pytest.fixture
def log(stack):
    log = KafkaEventLog(stack.kafka_bootstrap)
    yield log
    log.close()


def fill(log, topic: str, n: int) -> list[tuple[bytes, bytes, int]]:
    log.ensure_topics([topic], 4)
    rows = [(f"user-{i % 5}".encode(), json.dumps({"n": i}).encode(), 1_700_000_000_000 + i * 10) for i in range(n)]
    log.publish(topic, rows)
    return rows


def by_key(records) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for r in records:
        out.setdefault(r.key, []).append(r.value)
    return out


def test_record_then_replay_into_a_renamed_topic_is_an_exact_copy(stack, log, tmp_path):
    src, dst = f"rec-{uuid.uuid4().hex[:8]}", f"rep-{uuid.uuid4().hex[:8]}"
    sent = fill(log, src, 40)
    path = tmp_path / "rec.jsonl.gz"
    assert record(stack.kafka_bootstrap, [src], path, progress=False) == 40
    header, rows = read_recording(path)
    rows = list(rows)
    assert header["format"] == "streamrec.recording.v1" and header["messages"] == 40
    assert sorted((r.key, r.value, r.timestamp_ms) for r in rows) == sorted(sent)
    log.ensure_topics([dst], 4)
    assert replay(stack.kafka_bootstrap, path, rename={src: dst}, progress=False) == 40
    copied = log.read(dst, until=lambda r: len(r) >= 40, timeout_s=30)
    assert sorted((r.key, r.value, r.timestamp_ms) for r in copied) == sorted(sent)
    assert by_key(copied) == by_key(rows)  # every key's messages in their order


def test_record_count_and_offsets(stack, log, tmp_path):
    src = f"rec-{uuid.uuid4().hex[:8]}"
    fill(log, src, 20)
    assert record(stack.kafka_bootstrap, [src], tmp_path / "a.jsonl.gz", end="count:7", progress=False) == 7
    _, rows = read_recording(tmp_path / "a.jsonl.gz")
    assert len(list(rows)) == 7
    _, rows = read_recording(tmp_path / "a.jsonl.gz")
    assert [r.timestamp_ms for r in rows] == sorted(r.timestamp_ms for r in read_recording(tmp_path / "a.jsonl.gz")[1])
    # partition 0 from its second message, the others from the start: one message fewer
    n = record(stack.kafka_bootstrap, [src], tmp_path / "c.jsonl.gz", start="0=1", progress=False)
    _, rows = read_recording(tmp_path / "c.jsonl.gz")
    assert n == 19 and min(r.offset for r in rows if r.partition == 0) == 1


def test_replay_resumes_after_an_interruption_without_duplicates(stack, log, tmp_path):
    src, dst = f"rec-{uuid.uuid4().hex[:8]}", f"rep-{uuid.uuid4().hex[:8]}"
    sent = fill(log, src, 30)
    path = tmp_path / "rec.jsonl.gz"
    record(stack.kafka_bootstrap, [src], path, progress=False)
    log.ensure_topics([dst], 4)
    state = tmp_path / "state.json"
    first = replay(stack.kafka_bootstrap, path, rename={src: dst}, state=state, chunk=4, stop_after=10,
                   progress=False)
    assert first == 10 and json.loads(state.read_text())["sent"] == 10
    rest = replay(stack.kafka_bootstrap, path, rename={src: dst}, state=state, chunk=4, progress=False)
    assert rest == 20
    copied = log.read(dst, until=lambda r: len(r) >= 30, timeout_s=30)
    assert sorted(r.value for r in copied) == sorted(v for _, v, _ in sent)  # each exactly once
    assert replay(stack.kafka_bootstrap, path, rename={src: dst}, state=state, progress=False) == 0


def test_cli_record_and_replay(stack, log, tmp_path):
    src, dst = f"rec-{uuid.uuid4().hex[:8]}", f"rep-{uuid.uuid4().hex[:8]}"
    fill(log, src, 12)
    env = {"STREAMREC_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "PATH": "/usr/bin:/bin"}
    out = tmp_path / "r.jsonl.gz"
    rec = subprocess.run([sys.executable, "-m", "workers.cli", "record", src, "--out", str(out), "--quiet"],
                         env=env, capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    assert json.loads(rec.stdout)["recorded"] == 12 and gzip.open(out).readline()
    bad = subprocess.run([sys.executable, "-m", "workers.cli", "replay", str(out), "--rename", "nonsense"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "OLD=NEW" in bad.stderr
    log.ensure_topics([dst], 4)
    rep = subprocess.run([sys.executable, "-m", "workers.cli", "replay", str(out), "--rename", f"{src}={dst}",
                          "--quiet"], env=env, capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    assert json.loads(rep.stdout)["sent"] == 12
    assert len(log.read(dst, until=lambda r: len(r) >= 12, timeout_s=30)) == 12


def test_record_between_two_times(stack, log, tmp_path):
    src = f"rec-{uuid.uuid4().hex[:8]}"
    fill(log, src, 20)  # message i at 1_700_000_000_000 + 10 * i ms
    n = record(stack.kafka_bootstrap, [src], tmp_path / "t.jsonl.gz", start="1700000000.05",
               end="1700000000.149", progress=False)
    _, rows = read_recording(tmp_path / "t.jsonl.gz")
    assert n == 10 and sorted(json.loads(r.value)["n"] for r in rows) == list(range(5, 15))
