"""The settings object: environment names, nested model parameters, masking of secrets."""

from __future__ import annotations

import json

from workers.settings import Settings, mask_url


def test_fields_come_from_the_environment_with_nested_model_params(monkeypatch):
    monkeypatch.setenv("STREAMREC_K", "7")
    monkeypatch.setenv("STREAMREC_MODEL__SHORT_ALPHA", "0.5")
    s = Settings()
    assert s.k == 7 and s.model.short_alpha == 0.5 and s.model.long_alpha == 0.08


def test_printed_settings_never_show_secrets(monkeypatch):
    monkeypatch.setenv("STREAMREC_MILVUS_TOKEN", "root:Milvus-secret")
    monkeypatch.setenv("STREAMREC_REDIS_URL", "rediss://app:redis-secret@cache:6380/0")
    shown = json.dumps(Settings().masked())
    assert "Milvus-secret" not in shown and "redis-secret" not in shown
    assert '"milvus_token": "***"' in shown and "rediss://app:***@cache:6380/0" in shown


def test_mask_url():
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("redis://user@h:1") == "redis://user@h:1"
    assert mask_url("redis://h:1") == "redis://h:1"


def test_limits_are_settings_and_the_pipeline_enforces_them_with_reasons(monkeypatch):
    """STREAMREC_MAX_* set the limits; each rejection names the field, the size and the limit."""
    import asyncio

    from schemas import Limits
    from streams.pipeline import ItemCache, Pipeline, RawMessage
    from streams.stores import open_item_index, open_profile_store
    from tests.unit.test_pipeline import CATALOG, WordHashEncoder

    for name, value in {"MAX_TEXT_CHARS": "20", "MAX_LIST_ITEMS": "2", "MAX_K": "5", "MAX_ID_CHARS": "8",
                        "MAX_MESSAGE_BYTES": "600"}.items():
        monkeypatch.setenv(f"STREAMREC_{name}", value)
    limits = Limits.from_settings(Settings())
    assert limits == Limits(max_message_bytes=600, max_text_chars=20, max_id_chars=8, max_list_items=2, max_k=5)
    enc = WordHashEncoder()
    p = Pipeline(open_profile_store("memory://"), open_item_index("memory://", enc.dim), enc, Settings().model,
                 limits, k=5, item_cache=ItemCache(10, 60.0), clock=lambda: 2_000_000_000.0)
    asyncio.run(p.process_catalog([RawMessage("c", 0, 0, None, json.dumps({**CATALOG[0], "item_id": "i1"}).encode())]))
    base = {"user_id": "u1", "timestamp": 1.0}
    cases = [
        ("events", {"type": "query", "event_id": "e1", **base, "text": "x" * 21}, "query.text has 21 characters, limit 20"),
        ("events", {"type": "query", "event_id": "e2", **base, "text": "y" * 700}, "message is 7"),
        ("events", {"type": "click", "event_id": "e3-too-long", **base, "item_id": "i1"},
         "click.event_id has 11 characters, limit 8"),
        ("requests", {"type": "request", "request_id": "r1", **base, "k": 6}, "k must be within 1..5, got 6"),
        ("requests", {"type": "request", "request_id": "r2", **base, "exclude": ["a", "b", "c"]},
         "request.exclude has 3 entries, limit 2"),
    ]
    for topic, msg, reason in cases:
        raw = [RawMessage(topic, 0, 1, None, json.dumps(msg).encode())]
        out = asyncio.run(p.process_events(raw) if topic == "events" else p.process_requests(raw))
        assert not out.recommendations and len(out.dead_letters) == 1
        letter = json.loads(out.dead_letters[0][1])
        assert reason in letter["reason"], (letter, reason)
    ok = asyncio.run(p.process_requests([RawMessage("requests", 0, 2, None, json.dumps(
        {"type": "request", "request_id": "r3", **base, "k": 5, "exclude": ["a", "b"]}).encode())]))
    assert len(ok.recommendations) == 1 and not ok.dead_letters


def test_a_misspelt_variable_is_named_with_the_nearest_setting():
    from workers.runner import settings_env
    from workers.settings import unknown_variables

    env = {"STREAMREC_ENCODR_BACKEND": "onnx", "STREAMREC_MODEL__SHORT_ALHPA": "0.3", "STREAMREC_NOTHING_LIKE_IT": "1",
           "STREAMREC_K": "5", "STREAMREC_MODEL__LEARN_RATE": "0.1", "STREAMREC_TEST_BROKERS": "tansu", "HOME": "/root"}
    assert unknown_variables(env) == ["STREAMREC_ENCODR_BACKEND (did you mean STREAMREC_ENCODER_BACKEND?)",
                                      "STREAMREC_MODEL__SHORT_ALHPA (did you mean STREAMREC_MODEL__SHORT_ALPHA?)",
                                      "STREAMREC_NOTHING_LIKE_IT"]
    assert unknown_variables(settings_env(Settings())) == []  # what a worker's parent passes on is all known


def test_the_cli_refuses_an_unknown_variable(monkeypatch, capsys):
    import pytest

    from workers.cli import main

    monkeypatch.setenv("STREAMREC_BATCH_MAXX", "10")
    with pytest.raises(SystemExit) as exc:
        main(["config"])
    assert exc.value.code == 2
    assert "STREAMREC_BATCH_MAXX (did you mean STREAMREC_BATCH_MAX?)" in capsys.readouterr().err


def test_blas_threads_are_limited_while_asked_and_left_alone_at_zero():
    from threadpoolctl import threadpool_info

    from workers.worker import limit_blas_threads

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    assert before, "numpy has no BLAS that threadpoolctl sees"
    with limit_blas_threads(1):
        assert blas_threads() == {1}
    assert blas_threads() == before
    with limit_blas_threads(0):
        assert blas_threads() == before


def test_gc_tuning_raises_the_young_threshold_and_freezes_what_exists_or_leaves_python_alone():
    import gc

    from workers.worker import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(0)
        assert gc.get_threshold() == before
        kept: list = [[]]  # made before the tuning: frozen, never scanned again
        assert any(o is kept for o in gc.get_objects())
        tune_gc(50_000)
        assert gc.get_threshold() == (50_000, 20, 100)
        assert gc.get_freeze_count() > 0
        assert gc.is_tracked(kept) and not any(o is kept for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert Settings().gc_young_threshold == 50_000
