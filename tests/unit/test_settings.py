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
