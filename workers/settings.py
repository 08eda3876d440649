"""The one typed settings object. Every field can be set from the environment as
``STREAMREC_<FIELD>`` (e.g. ``STREAMREC_REDIS_URL``, nested: ``STREAMREC_MODEL__SHORT_ALPHA``); read it once in ``main()`` and pass it down."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.params import ModelParams


class Settings(BaseSettings):
    """Configuration of every streamrec process."""

    model_config = SettingsConfigDict(env_prefix="STREAMREC_", env_nested_delimiter="__", extra="ignore")

    # Kafka
    kafka_bootstrap: str = Field("localhost:9092", description="Kafka bootstrap servers, comma separated")
    app_id: str = Field("streamrec", description="Faust app id; also the Kafka consumer group")
    topic_events: str = Field("streamrec.events", description="click and query events, keyed by user_id")
    topic_catalog: str = Field("streamrec.catalog", description="item upserts and deletes, keyed by item_id")
    topic_requests: str = Field("streamrec.requests", description="on-demand recommendation requests")
    topic_recommendations: str = Field("streamrec.recommendations", description="recommendation lists out")
    topic_deadletter: str = Field("streamrec.deadletter", description="rejected input with its reason")
    topic_partitions: int = Field(4, ge=1, description="partitions for topics streamrec creates")
    topic_replication: int = Field(1, ge=1)
    kafka_fetch_max_wait_ms: int = Field(
        100, ge=1, description="longest wait of one consumer fetch; a broker that does not answer early "
        "(Tansu) adds up to this much latency")
    kafka_session_timeout_s: float = Field(30.0, gt=0, description="consumer group session timeout")
    kafka_rebalance_timeout_s: float = Field(
        30.0, gt=0, description="how long a rebalance waits for members to rejoin; a new group on some "
        "brokers (Tansu) waits this long before its first assignment")

    # Stores
    redis_url: str = Field("redis://localhost:6379/0", description="profile store URL (redis://, rediss://, memory://)")
    key_prefix: str = Field("streamrec", description="prefix of every Redis key")
    milvus_uri: str = Field("http://localhost:19530", description="item index URI (http(s)://host:port, a .db file, memory://)")
    milvus_token: SecretStr = Field(SecretStr(""), description="Milvus token (user:password or API key)")
    milvus_collection: str = Field("streamrec_items")
    milvus_consistency: str = Field("Strong", description="consistency level of candidate searches")
    milvus_flush_writes: bool = Field(
        True, description="flush after every catalog batch: searches then run on sealed, indexed segments "
        "(10x faster on Milvus Lite at 10,000 items); turn off on Milvus standalone with busy catalogs")
    milvus_index_type: str = Field(
        "FLAT", description="vector index of a new collection: FLAT is exact and deterministic (replays give "
        "the same lists); HNSW/AUTOINDEX are approximate, for catalogs of millions")

    # Encoder
    encoder_model: str = Field("", description="local transformers model path; empty: the packaged all-MiniLM-L6-v2")
    encoder_device: str = Field("auto", description="auto, cpu or cuda")
    encoder_max_length: int = Field(128, ge=8, le=512)
    encoder_batch_size: int = Field(64, ge=1)
    encoder_threads: int = Field(
        0, ge=0, description="torch CPU threads; 0: the machine's cores but one (at least one), which leaves "
        "a core to the event loop and the stores: on 2 shared cores, 2 torch threads encode 2.7x slower than 1")

    # Worker
    batch_max: int = Field(256, ge=1, description="largest micro-batch of events")
    batch_within_s: float = Field(0.05, gt=0, description="longest wait to fill a micro-batch")
    item_cache_size: int = Field(50_000, ge=0)
    item_cache_ttl_s: float = Field(60.0, ge=0)
    dedupe_window: int = Field(10_000, ge=1, description="applied event ids remembered per user")
    popularity_halflife_s: float = Field(6 * 3600.0, gt=0)
    cooccur_keep: int = Field(200, ge=1, description="co-clicked partners kept per item (the most frequent)")

    # Limits on input (longer or larger input is dead-lettered with the reason)
    max_text_chars: int = Field(2_000, ge=1)
    max_id_chars: int = Field(256, ge=1)
    max_list_items: int = Field(64, ge=1)
    max_message_bytes: int = Field(64_000, ge=256)
    max_future_s: float = Field(86_400.0, ge=0, description="how far ahead of the worker's clock an event time may be")

    # Recommendation
    k: int = Field(10, ge=1, description="list length when a request names none")
    max_k: int = Field(100, ge=1)
    model: ModelParams = Field(default_factory=ModelParams, description="profile update and ranking parameters")

    # The embedded stack
    data_dir: str = Field(".streamrec", description="where `streamrec up` keeps its files and a worker Faust's")

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every secret masked, for printing."""
        out = json.loads(self.model_dump_json())
        for name, value in self:
            if isinstance(value, SecretStr):
                out[name] = "***" if value.get_secret_value() else ""
        for name in ("redis_url", "kafka_bootstrap", "milvus_uri"):
            out[name] = mask_url(out[name])
        return out


def mask_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host``."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in cred else f"{scheme}://{user}@{host}"
