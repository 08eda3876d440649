"""Replay determinism: the checked-in recording ``tests/fixtures/replay-small.jsonl.gz`` (a catalog
and a stream of clicks and queries) replayed into two fresh stacks' worth of names gives the same
recommendations, item for item and in the same order, as the lists recorded with it. Popularity,
co-clicks, steps and the learned weights are off (``signals_off``): they mix in what every
partition has seen so far, so with them on, lists also depend on how partitions interleave. The
replay runs with the parameters the recording was made with (``PARAMS``).

Regenerate the recording (only when the input format changes) with
``python -m tests.integration.test_golden_replay``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from models.params import ModelParams
from tests.integration.conftest import Harness
from workers.replay import read_recording, replay
from workers.runner import read_outputs, wait_stat

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "replay-small.jsonl.gz"
SHARED = "popularity,cooccur,transitions,learning"  # signals that mix in every partition's events
RECORDED = {"catalog": "golden.catalog", "events": "golden.events", "recs": "golden.recs"}
#: The parameters the recording's lists were made with: two candidates per slot from each source,
#: the default when it was recorded.
PARAMS = ModelParams(signals_off=SHARED, oversample=2)


def replay_into(h: Harness) -> dict[str, list[str]]:
    """Replay the recording's inputs into ``h``'s topics; the item ids of each list by trigger."""
    s = h.settings
    rename = {RECORDED["catalog"]: s.topic_catalog, RECORDED["events"]: s.topic_events}
    header, rows = read_recording(FIXTURE)
    rows = list(rows)
    n_items = sum(r.topic == RECORDED["catalog"] for r in rows)
    event_ids = [json.loads(r.value)["event_id"] for r in rows if r.topic == RECORDED["events"]]
    replay(s.kafka_bootstrap, FIXTURE, rename=rename, topics=[RECORDED["catalog"]], progress=False)
    wait_stat(h.redis, h.prefix, "items_upserted", n_items, 180, h.worker)
    replay(s.kafka_bootstrap, FIXTURE, rename=rename, topics=[RECORDED["events"]], progress=False)
    got = read_outputs(h.log, s.topic_recommendations, event_ids, 180, h.worker)
    return {e: [i["item_id"] for i in got[e][0]["items"]] for e in event_ids}


def recorded_lists() -> dict[str, list[str]]:
    _, rows = read_recording(FIXTURE)
    out = {}
    for r in rows:
        if r.topic == RECORDED["recs"]:
            msg = json.loads(r.value)
            out[msg["trigger_event_id"]] = [i["item_id"] for i in msg["items"]]
    return out


@pytest.mark.every_broker
def test_replaying_the_same_inputs_gives_the_same_recommendations(stack, tmp_path):
    runs = []
    for n in range(2):
        h = Harness(stack, tmp_path / f"run{n}", model=PARAMS)
        try:
            runs.append(replay_into(h))
        finally:
            h.close()
    assert runs[0] == runs[1]
    assert runs[0] == recorded_lists()
    assert len(runs[0]) >= 50 and all(len(v) == 10 for v in runs[0].values())


def _make_fixture() -> None:  # pragma: no cover - run by hand
    import tempfile

    from streams.stores.eventlog import KafkaEventLog
    from workers import demo_data
    from workers.replay import record
    from workers.runner import encode_line
    from workers.stack import Stack

    catalog = demo_data.build_catalog(96)
    events, _ = demo_data.simulate_events(catalog, n_users=8, events_per_user=8, seed=5)
    base = 1_767_225_600.0
    with Stack(Path(tempfile.mkdtemp())) as stack:
        h = Harness(stack, Path(tempfile.mkdtemp()), model=PARAMS)
        try:
            log = KafkaEventLog(stack.kafka_bootstrap)
            log.ensure_topics(RECORDED.values(), 4)
            log.publish(RECORDED["catalog"], [(*encode_line({**it, "timestamp": base}), int(base * 1000))
                                              for it in catalog])
            stamped = [{**e, "timestamp": base + 60 + n} for n, e in enumerate(events)]
            log.publish(RECORDED["events"], [(*encode_line(e), int(e["timestamp"] * 1000)) for e in stamped])
            # the lists of one run, recorded beside the inputs
            rename = {RECORDED["catalog"]: h.settings.topic_catalog, RECORDED["events"]: h.settings.topic_events}
            tmp = Path(tempfile.mkdtemp()) / "inputs.jsonl.gz"
            record(stack.kafka_bootstrap, [RECORDED["catalog"], RECORDED["events"]], tmp, progress=False)
            replay(stack.kafka_bootstrap, tmp, rename=rename, topics=[RECORDED["catalog"]], progress=False)
            wait_stat(h.redis, h.prefix, "items_upserted", len(catalog), 180, h.worker)
            replay(stack.kafka_bootstrap, tmp, rename=rename, topics=[RECORDED["events"]], progress=False)
            got = read_outputs(h.log, h.settings.topic_recommendations, [e["event_id"] for e in events], 180)
            log.publish(RECORDED["recs"], [(e["user_id"].encode(), json.dumps(got[e["event_id"]][0]).encode(),
                                            int(time.time() * 1000)) for e in events])
            record(stack.kafka_bootstrap, list(RECORDED.values()), FIXTURE, progress=False)
            log.close()
        finally:
            h.close()
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    _make_fixture()
