"""Security settings without servers: validation, masking, the client options built for Kafka
(kafka-python, aiokafka through Faust), Redis and Milvus, the secured broker's properties, and the
worker's startup checks with stand-in probes."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time

import pytest
from pydantic import SecretStr, ValidationError

from streams.retry import Backoff
from streams.security import describe_kafka, describe_redis, kafka_client_options, kafka_ssl_context, redis_options
from workers.kafka_broker import check_users, scram_format_args, security_properties, server_properties
from workers.preflight import Probe, Rejected, ServiceError, cause, milvus_auth_error, probes, wait_until_up
from workers.settings import Settings

SECRET_FIELDS = sorted(n for n, f in Settings.model_fields.items() if f.annotation is SecretStr)


@pytest.fixture
def env(monkeypatch):
    """No STREAMREC_ variable from the surrounding environment."""
    for var in list(os.environ):
        if var.startswith("STREAMREC_"):
            monkeypatch.delenv(var)
    return monkeypatch


def sasl(protocol: str = "SASL_PLAINTEXT", mechanism: str = "PLAIN", **extra) -> Settings:
    return Settings(_env_file=None, kafka_bootstrap="k1:9093,k2:9093", kafka_security_protocol=protocol,
                    kafka_sasl_mechanism=mechanism, kafka_sasl_username="alice", kafka_sasl_password="kafka-secret",
                    **extra)


# ---- masking ------------------------------------------------------------------------------------

def test_the_secret_fields():
    assert SECRET_FIELDS == ["kafka_sasl_password", "kafka_ssl_key_password", "milvus_token", "redis_password"]


def all_secrets_set() -> Settings:
    return Settings(_env_file=None, kafka_bootstrap="sasl://bob:boot-secret@k:9093", kafka_security_protocol="SASL_SSL",
                    kafka_sasl_username="alice", kafka_sasl_password="kafka-secret", kafka_ssl_certfile="/c.pem",
                    kafka_ssl_key_password="key-secret", redis_url="rediss://cache:6380/0", redis_username="app",
                    redis_password="redis-secret", milvus_uri="https://root:uri-secret@milvus:19530",
                    milvus_token="root:milvus-secret")


def test_masked_hides_every_secret():
    s = all_secrets_set()
    shown = json.dumps(s.masked())
    for secret in ("kafka-secret", "key-secret", "redis-secret", "milvus-secret", "uri-secret", "boot-secret"):
        assert secret not in shown
    masked = s.masked()
    assert all(masked[name] == "***" for name in SECRET_FIELDS)
    assert masked["milvus_uri"] == "https://root:***@milvus:19530"
    assert masked["kafka_sasl_username"] == "alice" and masked["redis_username"] == "app"
    assert "kafka-secret" not in repr(s) and "kafka-secret" not in str(s)


def test_masked_leaves_unset_secrets_empty():
    assert all(Settings(_env_file=None).masked()[name] == "" for name in SECRET_FIELDS)


def test_scrub_replaces_every_secret_in_a_message():
    s = all_secrets_set()
    text = "kafka-secret key-secret redis-secret root:milvus-secret uri-secret boot-secret"
    assert s.scrub(text) == "*** *** *** *** *** ***"
    s2 = Settings(_env_file=None, redis_url="redis://:p%40ss@h:6379/0")
    assert s2.scrub("auth p@ss and p%40ss") == "auth *** and ***"


def test_config_command_prints_masked_json(env, capsys):
    from workers.cli import main

    env.setenv("STREAMREC_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    env.setenv("STREAMREC_KAFKA_SASL_USERNAME", "alice")
    env.setenv("STREAMREC_KAFKA_SASL_PASSWORD", "kafka-secret")
    env.setenv("STREAMREC_REDIS_URL", "redis://app:redis-secret@cache:6379/0")
    env.setenv("STREAMREC_MILVUS_TOKEN", "root:milvus-secret")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "secret" not in out
    shown = json.loads(out)
    assert shown["kafka_security_protocol"] == "SASL_SSL" and shown["kafka_sasl_password"] == "***"
    assert shown["redis_url"] == "redis://app:***@cache:6379/0" and shown["milvus_token"] == "***"


# ---- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "needs kafka_sasl_username and kafka_sasl_password"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "alice"}, "needs kafka_sasl_username"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_password": "pw"}, "needs kafka_sasl_username"),
    ({"kafka_sasl_username": "alice", "kafka_sasl_password": "pw"}, "kafka_security_protocol is PLAINTEXT"),
    ({"kafka_security_protocol": "SSL", "kafka_sasl_password": "pw"}, "use SASL_PLAINTEXT or SASL_SSL"),
    ({"kafka_ssl_cafile": "/ca.pem"}, "kafka_ssl_cafile set but kafka_security_protocol is PLAINTEXT"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"}, "kafka_ssl_keyfile needs kafka_ssl_certfile"),
    ({"kafka_security_protocol": "SASL_TLS"}, "kafka_security_protocol"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI", "kafka_sasl_username": "a",
      "kafka_sasl_password": "p"}, "kafka_sasl_mechanism"),
    ({"redis_ssl_cafile": "/ca.pem"}, "redis_url is not rediss://"),
    ({"redis_url": "rediss://h:6380/0", "redis_ssl_keyfile": "/k.pem"}, "redis_ssl_keyfile needs redis_ssl_certfile"),
    ({"redis_url": "redis://:a@h:6379/0", "redis_password": "b"}, "a Redis password in both"),
    ({"redis_url": "redis://u@h:6379/0", "redis_username": "v"}, "a Redis user in both"),
    ({"startup_timeout_s": -1}, "startup_timeout_s"),
])
def test_invalid_combinations_are_clear_errors(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None, **kwargs)


def test_protocol_and_mechanism_are_case_insensitive():
    s = sasl("sasl_ssl", "scram-sha-256")
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")


def test_invalid_settings_exit_with_the_problems_and_no_secret(env, capsys):
    from workers.cli import main

    env.setenv("STREAMREC_KAFKA_SASL_PASSWORD", "kafka-secret")  # without SASL
    env.setenv("STREAMREC_MILVUS_TOKEN", "root:milvus-secret")
    with pytest.raises(SystemExit) as exit_:
        main(["config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "use SASL_PLAINTEXT or SASL_SSL" in err
    assert "secret" not in err and "Traceback" not in err


# ---- Kafka client options -----------------------------------------------------------------------

def test_plaintext_options():
    s = Settings(_env_file=None)
    assert kafka_client_options(s) == {"security_protocol": "PLAINTEXT"}
    assert kafka_ssl_context(s) is None
    assert describe_kafka(s) == "localhost:9092 (PLAINTEXT)"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_options(mechanism):
    s = sasl("SASL_PLAINTEXT", mechanism)
    assert kafka_client_options(s) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism,
                                       "sasl_plain_username": "alice", "sasl_plain_password": "kafka-secret"}
    assert describe_kafka(s) == f"k1:9093,k2:9093 (SASL_PLAINTEXT, {mechanism}, user alice)"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_options_verify_the_broker(mechanism):
    import certifi

    s = sasl("SASL_SSL", mechanism, kafka_ssl_cafile=certifi.where())
    opts = kafka_client_options(s)
    ctx = opts.pop("ssl_context")
    assert opts == {"security_protocol": "SASL_SSL", "sasl_mechanism": mechanism, "sasl_plain_username": "alice",
                    "sasl_plain_password": "kafka-secret"}
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] > 10  # the CA file's certificates


def test_ssl_options_without_a_ca_file_trust_the_system_and_may_skip_host_names():
    s = Settings(_env_file=None, kafka_security_protocol="SSL", kafka_ssl_check_hostname=False)
    opts = kafka_client_options(s)
    assert set(opts) == {"security_protocol", "ssl_context"} and opts["security_protocol"] == "SSL"
    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED and not opts["ssl_context"].check_hostname


def test_event_log_from_settings_passes_the_options_to_kafka_python():
    from streams.stores.eventlog import KafkaEventLog

    log = KafkaEventLog.from_settings(sasl("SASL_PLAINTEXT", "SCRAM-SHA-256"), client_id="t")
    common = log._common()
    assert common["bootstrap_servers"] == ["k1:9093", "k2:9093"] and common["client_id"] == "t"
    assert common["sasl_mechanism"] == "SCRAM-SHA-256" and common["sasl_plain_password"] == "kafka-secret"
    assert KafkaEventLog("h:1")._common() == {"bootstrap_servers": ["h:1"], "client_id": "streamrec-tools"}


@pytest.mark.parametrize("protocol, mechanism", [("SASL_PLAINTEXT", "PLAIN"), ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
                                                 ("SASL_SSL", "SCRAM-SHA-512"), ("SSL", None), ("PLAINTEXT", None)])
def test_faust_producer_and_consumers_log_in(protocol, mechanism):
    """The aiokafka clients Faust builds (producer, group consumer, client consumer) carry the
    settings' security; built only, nothing connects."""
    from streams.app import broker_credentials, create_app

    s = sasl(protocol, mechanism) if mechanism else Settings(_env_file=None, kafka_security_protocol=protocol)
    creds = broker_credentials(s)
    assert (creds is None) == (protocol == "PLAINTEXT")

    async def clients():
        app = create_app(s)
        thread = app.consumer._thread
        built = [app.producer._new_producer(), thread._create_worker_consumer(app.transport),
                 thread._create_client_consumer(app.transport)]
        out = [c.client if hasattr(c, "client") else c._client for c in built]
        for c in built:
            await c.stop()
        return out

    for client in asyncio.run(clients()):
        assert client._security_protocol == protocol
        if mechanism:
            assert (client._sasl_mechanism, client._sasl_plain_username, client._sasl_plain_password) == \
                (mechanism, "alice", "kafka-secret")
        assert (client._ssl_context is not None) == protocol.endswith("SSL")


# ---- Redis --------------------------------------------------------------------------------------

def test_redis_options_and_description():
    s = Settings(_env_file=None, redis_username="alice", redis_password="redis-secret")
    assert redis_options(s) == {"username": "alice", "password": "redis-secret"}
    assert describe_redis(s) == "redis://localhost:6379/0 (user alice, password)"
    s = Settings(_env_file=None, redis_url="redis://:redis-secret@h:6379/0")
    assert redis_options(s) == {} and describe_redis(s) == "redis://:***@h:6379/0 (password)"
    s = Settings(_env_file=None, redis_url="redis://bob@h:6379/0", redis_password="redis-secret")
    assert describe_redis(s) == "redis://bob@h:6379/0 (user bob, password)"
    assert describe_redis(Settings(_env_file=None)) == "redis://localhost:6379/0 (no credentials)"


def test_rediss_options_reach_the_tls_connection():
    """rediss:// with the TLS files: the store's connection pool makes TLS connections with them
    (built only; the redis-server in the test stack has no TLS, see tests/integration/test_security.py)."""
    from redis.asyncio.connection import SSLConnection

    from streams.stores.redis_profiles import RedisProfileStore

    s = Settings(_env_file=None, redis_url="rediss://cache:6380/0", redis_username="alice",
                 redis_password="redis-secret", redis_ssl_cafile="/ca.pem", redis_ssl_certfile="/c.pem",
                 redis_ssl_keyfile="/k.pem")
    opts = redis_options(s)
    assert opts == {"username": "alice", "password": "redis-secret", "ssl_ca_certs": "/ca.pem",
                    "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}
    store = RedisProfileStore(s.redis_url, "p", redis_options=opts)
    pool = store.redis.connection_pool
    assert pool.connection_class is SSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["ssl_ca_certs"]) == ("alice", "redis-secret", "/ca.pem")
    assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"], kwargs["host"], kwargs["port"]) == \
        ("/c.pem", "/k.pem", "cache", 6380)


# ---- the secured test broker --------------------------------------------------------------------

def test_secured_broker_properties(tmp_path):
    props = server_properties(tmp_path, 9092, 9093)
    props.update(security_properties("127.0.0.1", 9092, 9093, {"alice": "a-pw", "bob": "b-pw"}, 9094, 9095,
                                     tmp_path / "ks.p12", "ks-pw"))
    assert props["listeners"] == ("PLAINTEXT://127.0.0.1:9092,SASL_PLAINTEXT://127.0.0.1:9094,"
                                  "SASL_SSL://127.0.0.1:9095,CONTROLLER://127.0.0.1:9093")
    assert props["advertised.listeners"] == \
        "PLAINTEXT://127.0.0.1:9092,SASL_PLAINTEXT://127.0.0.1:9094,SASL_SSL://127.0.0.1:9095"
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert set(props["listener.security.protocol.map"].split(",")) == {
        "PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT", "SASL_PLAINTEXT:SASL_PLAINTEXT", "SASL_SSL:SASL_SSL"}
    assert props["sasl.enabled.mechanisms"] == "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    for listener in ("sasl_plaintext", "sasl_ssl"):
        assert 'user_alice="a-pw" user_bob="b-pw";' in props[f"listener.name.{listener}.plain.sasl.jaas.config"]
        assert "ScramLoginModule" in props[f"listener.name.{listener}.scram-sha-512.sasl.jaas.config"]
    assert props["ssl.keystore.type"] == "PKCS12" and props["ssl.keystore.password"] == "ks-pw"
    without_tls = security_properties("127.0.0.1", 9092, 9093, {"alice": "a-pw"}, 9094)
    assert "SASL_SSL" not in without_tls["listeners"] and "ssl.keystore.location" not in without_tls


def test_scram_users_are_created_at_format_time():
    assert scram_format_args({"alice": "a-pw"}) == [
        "--add-scram", "SCRAM-SHA-256=[name=alice,password=a-pw]",
        "--add-scram", "SCRAM-SHA-512=[name=alice,password=a-pw]"]
    for bad in ({}, {"al ice": "pw"}, {"alice": 'p"w'}, {"alice": "p,w"}):
        with pytest.raises(ValueError):
            check_users(bad)


# ---- startup checks -----------------------------------------------------------------------------

def probe_failing(errors: list[BaseException]) -> tuple[Probe, list[int]]:
    calls = [0]

    async def check(timeout_s: float) -> None:
        calls[0] += 1
        if errors:
            raise errors.pop(0)

    return Probe("Kafka", "h:1 (PLAINTEXT)", check, "a hint"), calls


FAST = Backoff(base_s=0.01, cap_s=0.02)


def test_a_rejection_ends_at_once():
    probe, calls = probe_failing([Rejected("rejected the credentials: bad")] * 3)
    t = time.monotonic()
    with pytest.raises(ServiceError, match=r"^Kafka at h:1 \(PLAINTEXT\) rejected the credentials: bad$"):
        asyncio.run(wait_until_up(probe, time.monotonic() + 30, FAST))
    assert calls[0] == 1 and time.monotonic() - t < 1


def test_an_unreachable_service_is_retried_until_it_answers():
    probe, calls = probe_failing([ConnectionRefusedError("refused")] * 3)
    asyncio.run(wait_until_up(probe, time.monotonic() + 30, FAST))
    assert calls[0] == 4


def test_an_unreachable_service_fails_at_the_deadline():
    probe, calls = probe_failing([ConnectionRefusedError("refused")] * 1000)
    t = time.monotonic()
    with pytest.raises(ServiceError, match=r"not reachable after 0 s \(startup_timeout_s\): "
                                           r"ConnectionRefusedError: refused \(a hint\)"):
        asyncio.run(wait_until_up(probe, time.monotonic() + 0.3, FAST))
    assert 0.3 <= time.monotonic() - t < 2 and calls[0] > 2


def test_probes_skip_local_stores():
    names = lambda s: [p.service for p in probes(s)]  # noqa: E731
    assert names(Settings(_env_file=None)) == ["Kafka", "Redis", "Milvus"]
    assert names(Settings(_env_file=None, redis_url="memory://", milvus_uri="memory://")) == ["Kafka"]
    assert names(Settings(_env_file=None, milvus_uri="./items.db")) == ["Kafka", "Redis"]
    milvus = probes(Settings(_env_file=None, milvus_uri="https://m:443", milvus_token="root:milvus-secret"))[2]
    assert milvus.address == "https://m:443 (token)"


def test_milvus_auth_errors_are_told_apart():
    from pymilvus.exceptions import MilvusException

    class RpcError(Exception):
        def __init__(self, name):
            self._name = name

        def code(self):
            return type("Code", (), {"name": self._name})()

    assert milvus_auth_error(MilvusException(1800, "auth check failure, please check username, password or token"))
    assert milvus_auth_error(RpcError("UNAUTHENTICATED")) and milvus_auth_error(RpcError("PERMISSION_DENIED"))
    assert not milvus_auth_error(MilvusException(2, "Fail connecting to server on h:1, server unavailable"))
    assert not milvus_auth_error(RpcError("UNAVAILABLE"))
    # pymilvus's own words for a refused login hide gRPC's answer in the cause
    try:
        try:
            raise RpcError("UNAUTHENTICATED")
        except RpcError as inner:
            raise MilvusException(2, "Fail connecting to server on h:1, illegal connection params or server "
                                     "unavailable") from inner
    except MilvusException as outer:
        assert milvus_auth_error(outer) is outer.__cause__


def test_cause_names_the_type_once():
    assert cause(ConnectionRefusedError("refused")) == "ConnectionRefusedError: refused"
    assert cause(ValueError("ValueError: twice\nmore")) == "ValueError: twice"
    assert cause(TimeoutError()) == "TimeoutError"


def test_a_cluster_url_gives_a_cluster_client_with_its_nodes_and_credentials():
    from redis.asyncio.cluster import RedisCluster

    from streams.stores.redis_profiles import connect

    r = connect("redis+cluster://alice:s3cret@10.0.0.1:7000,10.0.0.2:7001")
    assert isinstance(r, RedisCluster)
    assert [(n.host, n.port) for n in r.nodes_manager.startup_nodes.values()] == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    kwargs = next(iter(r.nodes_manager.startup_nodes.values())).connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("alice", "s3cret")
    s = Settings(_env_file=None, redis_url="rediss+cluster://10.0.0.1:7000", redis_ssl_cafile="/ca.pem")
    assert redis_options(s) == {"ssl_ca_certs": "/ca.pem"}  # TLS files are allowed with a TLS cluster URL
