"""The one typed settings object. Every field can be set from the environment as
``STREAMREC_<FIELD>`` (e.g. ``STREAMREC_REDIS_URL``, nested: ``STREAMREC_MODEL__SHORT_ALPHA``); read it once in ``main()`` and pass it down."""

from __future__ import annotations

import json
from typing import Any, Literal, Mapping
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.params import ModelParams


#: STREAMREC_* variables that are not settings: read by the test suite and its reports.
OTHER_VARIABLES = frozenset({"STREAMREC_TEST_BROKERS", "STREAMREC_TEST_SEED", "STREAMREC_TEST_BAD_INPUTS",
                             "STREAMREC_REPORT_DIR", "STREAMREC_LOGLEVEL"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``STREAMREC_*`` names in ``environ`` that name no setting (a misspelt one would otherwise be
    ignored), each with the nearest setting's name when one is close."""
    import dataclasses
    import difflib

    known = {f"STREAMREC_{name.upper()}" for name in Settings.model_fields if name != "model"}
    known |= {f"STREAMREC_MODEL__{f.name.upper()}" for f in dataclasses.fields(ModelParams)}
    out = []
    for name in sorted(environ):
        if name.startswith("STREAMREC_") and name not in known and name not in OTHER_VARIABLES:
            near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            out.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return out


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
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="SASL_* logs in with the user below; *SSL is TLS")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (SASL_* protocols only)")
    kafka_sasl_username: str = Field("", description="SASL user (SASL_* protocols only)")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password")
    kafka_ssl_cafile: str = Field("", description="PEM of the CAs to trust; empty: the system's")
    kafka_ssl_certfile: str = Field("", description="client certificate PEM, for brokers that require one")
    kafka_ssl_keyfile: str = Field("", description="its private key PEM (may be in the certfile)")
    kafka_ssl_key_password: SecretStr = Field(SecretStr(""), description="password of an encrypted keyfile")
    kafka_ssl_check_hostname: bool = Field(True, description="check that the broker's certificate names its host")

    # Stores
    redis_url: str = Field("redis://localhost:6379/0", description="profile store URL (redis://, rediss://, redis+cluster://host:port[,host:port], memory://)")
    redis_username: str = Field("", description="Redis ACL user; empty: the URL's, else `default`")
    redis_password: SecretStr = Field(SecretStr(""), description="Redis password; empty: the URL's, if any")
    redis_ssl_cafile: str = Field("", description="rediss://: PEM of the CAs to trust; empty: the system's")
    redis_ssl_certfile: str = Field("", description="rediss://: client certificate PEM")
    redis_ssl_keyfile: str = Field("", description="rediss://: its private key PEM")
    key_prefix: str = Field("streamrec", description="prefix of every Redis key")
    milvus_uri: str = Field("http://localhost:19530", description="item index URI (http(s)://host:port, a .db file, memory://)")
    milvus_token: SecretStr = Field(SecretStr(""), description="Milvus token (user:password or API key)")
    milvus_collection: str = Field("streamrec_items")
    milvus_consistency: str = Field("Strong", description="consistency level of candidate searches")
    milvus_flush_writes: bool = Field(
        True, description="flush after every catalog batch: searches then run on sealed, indexed segments "
        "(10x faster on Milvus Lite at 10,000 items); turn off on Milvus standalone with busy catalogs")
    milvus_timeout_s: float = Field(
        30.0, gt=0, description="longest wait of one Milvus call, its client's own retries included; the "
        "worker then backs off and tries the batch again (unbounded, pymilvus retries for many minutes)")
    milvus_index_type: Literal["FLAT", "HNSW", "AUTOINDEX"] = Field(
        "FLAT", description="vector index of a new collection: FLAT is exact and deterministic (replays give "
        "the same lists); HNSW (M 16, efConstruction 200, ef at least 64) and AUTOINDEX are approximate, for "
        "catalogs of millions")

    # Encoder
    encoder_model: str = Field("", description="local transformers model path; empty: the packaged all-MiniLM-L6-v2")
    encoder_backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto", description="auto: torch on a CUDA device, else ONNX Runtime fp32 (the same vectors, faster on "
        "CPUs: `streamrec bench`); onnx-int8 is another encoder (its own vectors and collection)")
    encoder_cache_dir: str = Field("", description="where ONNX graphs exported from the model are kept; empty: "
                                   "$XDG_CACHE_HOME/streamrec/encoders (~/.cache/streamrec/encoders)")
    encoder_device: str = Field("auto", description="auto, cpu or cuda")
    encoder_max_length: int = Field(128, ge=8, le=512)
    encoder_batch_size: int = Field(64, ge=1)
    encoder_threads: int = Field(
        0, ge=0, description="torch CPU threads; 0: the machine's cores but one (at least one), which leaves "
        "a core to the event loop and the stores: on 2 shared cores, 2 torch threads encode 2.7x slower than 1")

    # Worker
    blas_threads: int = Field(
        1, ge=0, description="BLAS threads of the worker's numpy; 0: the library's default. Its products are "
        "small: extra BLAS threads spin after each one, on cores that the stores on the host could use")
    gc_young_threshold: int = Field(
        50_000, ge=0, description="allocations between collections of the garbage collector's youngest generation "
        "(Python's default is 700); 0 leaves the collector as Python sets it. The worker's objects are rarely cyclic: "
        "with the default, collecting them took about a third of its CPU")
    batch_max: int = Field(256, ge=1, description="largest micro-batch of events")
    batch_within_s: float = Field(0.05, gt=0, description="longest wait to fill a micro-batch")
    search_ahead: bool = Field(True, description="search the index for the events held behind the running batch "
                               "while it runs (the same lists; it pays where the index, not the worker, is slower)")
    item_cache_size: int = Field(50_000, ge=0)
    item_cache_ttl_s: float = Field(60.0, ge=0)
    popularity_halflife_s: float = Field(6 * 3600.0, gt=0, description="popularity halves over this much event time")
    cooccur_halflife_s: float = Field(365 * 86400.0, gt=0, description="co-clicks, steps and clicks per item halve over this much event time")
    cooccur_keep: int = Field(200, ge=1, description="co-clicked partners kept per item (the strongest, decayed)")
    popular_keep: int = Field(5_000, ge=1, description="items kept per shard in each popularity list")
    state_shards: int = Field(16, ge=1, description="shards of per-item state and stats in Redis; fixed for a key prefix")
    forget_ttl_s: float = Field(7 * 86400.0, gt=0, description="how long a forgotten user's tombstone recognises "
                                "redelivered events (it holds no personal data)")
    redis_wait_replicas: int = Field(0, ge=0, description="each batch's Redis writes wait for this many replicas "
                                     "(WAIT) before it is acked; 1 on a cluster with replicas survives a failover")
    log_format: Literal["text", "json"] = Field(
        "text", description="worker logs: text, or JSON lines (time, level, logger, message, pid, exc) for log shippers")
    metrics_port: int = Field(0, ge=0, le=65535, description="serve /metrics (Prometheus text), /health, /ready "
                              "and the live page (/) on this port; 0: off")
    metrics_host: str = Field("127.0.0.1", description="address /metrics, /health, /ready and the live page listen on")
    startup_timeout_s: float = Field(
        30.0, ge=0, description="how long a starting worker waits for an unreachable Kafka, Redis or Milvus; "
        "rejected credentials fail at once")

    def open_encoder(self):
        """The encoder these settings name, loaded (``models.encoder.open_encoder``)."""
        import os
        from pathlib import Path

        from models.encoder import open_encoder

        cache = self.encoder_cache_dir or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                              / "streamrec" / "encoders")
        return open_encoder(self.encoder_backend, self.encoder_model, self.encoder_device, self.encoder_max_length,
                            self.encoder_batch_size, self.encoder_threads, cache)

    def store_options(self):
        """The profile store's tunables."""
        from streams.stores.profiles import StoreOptions

        return StoreOptions(shards=self.state_shards, popularity_halflife_s=self.popularity_halflife_s,
                            cooccur_halflife_s=self.cooccur_halflife_s, cooccur_keep=self.cooccur_keep,
                            popular_keep=self.popular_keep, forget_ttl_s=self.forget_ttl_s,
                            wait_replicas=self.redis_wait_replicas)

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

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_security(self) -> "Settings":
        protocol = self.kafka_security_protocol
        sasl, tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
        has_password = bool(self.kafka_sasl_password.get_secret_value())
        if sasl and not (self.kafka_sasl_username and has_password):
            raise ValueError(f"kafka_security_protocol={protocol} needs kafka_sasl_username and kafka_sasl_password")
        if not sasl and (self.kafka_sasl_username or has_password):
            raise ValueError(f"a Kafka SASL user or password is set but kafka_security_protocol is {protocol}: "
                             "use SASL_PLAINTEXT or SASL_SSL")
        tls_files = [n for n in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile") if getattr(self, n)]
        if tls_files and not tls:
            raise ValueError(f"{', '.join(tls_files)} set but kafka_security_protocol is {protocol}: use SSL or SASL_SSL")
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            raise ValueError("kafka_ssl_keyfile needs kafka_ssl_certfile")
        url = urlsplit(self.redis_url.replace("+cluster", "", 1))
        tls_files = [n for n in ("redis_ssl_cafile", "redis_ssl_certfile", "redis_ssl_keyfile") if getattr(self, n)]
        if tls_files and url.scheme != "rediss":
            raise ValueError(f"{', '.join(tls_files)} set but redis_url is not rediss:// (TLS)")
        if self.redis_ssl_keyfile and not self.redis_ssl_certfile:
            raise ValueError("redis_ssl_keyfile needs redis_ssl_certfile")
        if self.redis_username and url.username:
            raise ValueError("a Redis user in both redis_url and redis_username: give it once")
        if self.redis_password.get_secret_value() and url.password:
            raise ValueError("a Redis password in both redis_url and redis_password: give it once")
        return self

    def secrets(self) -> list[str]:
        """Every secret value: the SecretStr fields and the passwords inside URLs."""
        out = [v.get_secret_value() for _, v in self if isinstance(v, SecretStr)]
        for url in (self.redis_url, self.milvus_uri, self.kafka_bootstrap):
            try:
                password = urlsplit(url).password
            except ValueError:
                password = None
            out += [password, unquote(password)] if password else []
        return sorted({s for s in out if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` with every secret of these settings replaced by ``***`` (for error messages
        that quote a server or a client library)."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text

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
