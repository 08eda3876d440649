"""The online ranker: features, pairwise steps, impressions in the profile record, and the steps
applied once by the pipeline and the store."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from models.learning import F, FEATURES, MODEL_ID, Impression, default_weights, pairwise_step, rank_feature, weights_from
from models.params import ModelParams
from models.profile import Profile
from models.ranking import Candidate, Signals, rank
from streams.stores import codec
from tests.unit.test_pipeline import (CATALOG, click, items_of, make_pipeline, msgs, recs, run_catalog,
                                      run_events)

P = ModelParams()


def test_rank_feature_is_one_over_one_plus_rank_and_zero_without_the_signal():
    got = rank_feature(np.array([0.2, 0.0, 0.9, 0.2, -1.0]))
    assert got.tolist() == pytest.approx([1 / 2, 0.0, 1.0, 1 / 2, 0.0])


def test_a_step_moves_the_weights_toward_the_clicked_candidate():
    X = np.zeros((3, F))
    X[0, FEATURES.index("text")] = 0.9  # ranked first by text
    X[1, FEATURES.index("transitions")] = 0.8  # the one clicked: only transitions say so
    X[2, FEATURES.index("popularity")] = 0.5
    imp = Impression.of([10, 11, 12], X)
    w = default_weights(P)
    step = pairwise_step(imp, 11, w, P)
    assert step[FEATURES.index("transitions")] > 0 and step[FEATURES.index("text")] < 0
    assert step[FEATURES.index("popularity")] < 0
    # many such clicks bring the clicked kind of candidate to the top
    for _ in range(300):
        w = w + pairwise_step(imp, 11, w, P)
    assert int(np.argmax(imp.matrix() @ w)) == 1


def test_no_step_for_a_click_outside_the_list_or_with_learning_off():
    imp = Impression.of([1, 2], np.ones((2, F)) * 0.1)
    assert pairwise_step(imp, 3, default_weights(P), P) is None
    assert pairwise_step(imp, 1, default_weights(P), ModelParams(learn_rate=0.0)) is None
    assert pairwise_step(imp, 1, default_weights(P), ModelParams(signals_off="learning")) is None


def test_weights_are_defaults_plus_steps_of_this_model_only_and_signals_switch_off():
    stored = {"model": MODEL_ID, "text": 0.5, "cooccur": -0.1}
    w = weights_from(stored, P)
    assert w[0] == pytest.approx(P.w_text + 0.5) and w[1] == pytest.approx(P.w_cooccur - 0.1)
    assert weights_from({"model": "rank-v0:text", "text": 9.0}, P).tolist() == default_weights(P).tolist()
    off = weights_from(stored, ModelParams(signals_off="text,learning"))
    assert off[FEATURES.index("text")] == 0 and off[FEATURES.index("text_rank")] == 0
    assert off[FEATURES.index("cooccur")] == pytest.approx(P.w_cooccur)
    with pytest.raises(ValueError, match="unknown signals"):
        ModelParams(signals_off="text,colour")


def test_rank_keeps_an_impression_and_explains_by_the_strongest_signal():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(4, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cands = [Candidate(f"i{n}", 0.1 * n, vecs[n], f"T{n}", "c", (), True, n) for n in range(4)]
    sig = Signals(transitions={"i0": 5.0}, transitions_from={"i0": "Alien"})
    out = rank(Profile("u"), cands, 3, None, 1, P, signals=sig)
    assert out[0].item_id == "i0" and out[0].reason == "often clicked after Alien"
    assert out.impression.numbers[0] == 0 and len(out.impression.numbers) == 4
    assert out.impression.features.dtype == np.int8 and out.impression.features.shape == (4, F)


def test_the_impression_survives_the_record_and_old_records_read_without_one():
    p = Profile("u", clicks=1)
    p.shown = Impression.of([7, 3], np.array([[0.5] * F, [-0.25] * F]))
    back, _ = codec.decode("u", codec.encode(p, 1))
    assert back.shown.numbers == [7, 3] and np.array_equal(back.shown.features, p.shown.features)
    old = bytearray(codec.encode(Profile("u", clicks=1), 1))
    old[2] = 2  # schema 2: the same record without the impression
    back, _ = codec.decode("u", bytes(old[:-2]))
    assert back.clicks == 1 and back.shown.numbers == []


def test_the_pipeline_learns_from_clicks_on_lists_and_applies_each_step_once():
    p = make_pipeline()
    run_catalog(p, msgs(CATALOG, "catalog"))
    jazz = items_of("jazz")
    first = recs(run_events(p, msgs([click("a1", "u", jazz[0])])))[0]
    pick = first["items"][3]["item_id"]  # a click on the 4th item of the list shown
    batch = msgs([click("a2", "u", pick)])
    run_events(p, batch)
    model = asyncio.run(p.profiles.model())
    assert model["model"] == MODEL_ID and model["steps"] == 1
    before = {f: model[f] for f in FEATURES}
    out = asyncio.run(p.process_events(batch))  # the same message again: a redelivery
    asyncio.run(p.commit(out))
    assert not out.effects.learn
    again = asyncio.run(p.profiles.model())
    assert {f: again[f] for f in FEATURES} == before and again["steps"] == 1


def test_a_batch_stopped_after_its_effects_steps_once_when_it_runs_again():
    p = make_pipeline()
    run_catalog(p, msgs(CATALOG, "catalog"))
    jazz = items_of("jazz")
    first = recs(run_events(p, msgs([click("a1", "u", jazz[0])])))[0]
    batch = msgs([click("a2", "u", first["items"][1]["item_id"])])
    out = asyncio.run(p.process_events(batch))
    assert len(out.effects.learn) == 1
    asyncio.run(p.profiles.apply(out.effects))  # stopped here: the profile was not written
    run_events(p, batch)  # runs again: the click is new to the profile, its step is not to the store
    assert asyncio.run(p.profiles.model())["steps"] == 1


def test_ablations_run_the_pipeline_in_process_with_each_signal_off():
    from tests.unit.test_pipeline import WordHashEncoder
    from workers.datasets import Dataset
    from workers.evaluate import EvalOptions, run_ablations
    from workers.settings import Settings

    users = [f"u{n}" for n in range(6)]
    jazz, cooking = items_of("jazz"), items_of("cooking")
    events = [click(f"e{u}{j}", u, item) | {"timestamp": 1000.0 + 10 * j}
              for u in users for j, item in enumerate([*jazz[:3], *cooking[:3]])]
    data = Dataset("tiny", CATALOG, events)
    seconds: dict[str, float] = {}
    runs = run_ablations(Settings(_env_file=None), data, events, EvalOptions(ablate=("text", "transitions")),
                         seconds, encoder=WordHashEncoder())
    assert set(runs) == set(seconds) == {"ablation:all", "ablation:-text", "ablation:-transitions"}
    assert all(len(lists) == len(events) for lists in runs.values())
    last = events[-1]["event_id"]
    assert runs["ablation:all"][last] != runs["ablation:-text"][last]  # text finds the rest of the topics
