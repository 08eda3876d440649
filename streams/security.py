"""Client options for secured services, from the settings: Kafka (SASL PLAIN or SCRAM, TLS) for
kafka-python and aiokafka, Redis (ACL user, password, TLS) for redis-py, and one-line
descriptions of each address that name the user and never a secret."""

from __future__ import annotations

import ssl
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

from streams.settings import Settings, mask_url


def kafka_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol.startswith("SASL_")


def kafka_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol.endswith("SSL")


def kafka_ssl_context(settings: Settings) -> Optional[ssl.SSLContext]:
    """The TLS context of every Kafka client (``None`` without TLS): the CAs of ``kafka_ssl_cafile``
    (else the system's), a client certificate when given, host names checked unless turned off."""
    if not kafka_tls(settings):
        return None
    ctx = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile:
        ctx.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None,
                            settings.kafka_ssl_key_password.get_secret_value() or None)
    return ctx


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """Security keyword arguments of kafka-python's clients (``KafkaProducer``, ``KafkaConsumer``,
    ``KafkaAdminClient``); aiokafka takes the same names."""
    opts: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if kafka_sasl(settings):
        opts.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                    sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    if kafka_tls(settings):
        opts["ssl_context"] = kafka_ssl_context(settings)
    return opts


def redis_options(settings: Settings) -> dict[str, Any]:
    """redis-py keyword arguments laid over ``redis_url``: the user and password of the settings
    (the URL's otherwise) and, for ``rediss://``, the TLS files."""
    opts: dict[str, Any] = {}
    if settings.redis_username:
        opts["username"] = settings.redis_username
    if settings.redis_password.get_secret_value():
        opts["password"] = settings.redis_password.get_secret_value()
    for name in ("cafile", "certfile", "keyfile"):
        value = getattr(settings, f"redis_ssl_{name}")
        if value:
            opts["ssl_ca_certs" if name == "cafile" else f"ssl_{name}"] = value
    return opts


def describe_kafka(settings: Settings) -> str:
    """``host:port (SASL_SSL, SCRAM-SHA-512, user alice)``: the address and how it is logged into."""
    how = [settings.kafka_security_protocol]
    if kafka_sasl(settings):
        how += [settings.kafka_sasl_mechanism, f"user {settings.kafka_sasl_username}"]
    return f"{mask_url(settings.kafka_bootstrap)} ({', '.join(how)})"


def describe_redis(settings: Settings) -> str:
    """``redis://host:port/0 (user alice, password)``: the masked URL and the credentials it uses."""
    url = urlsplit(settings.redis_url)
    user = settings.redis_username or (unquote(url.username) if url.username else "")
    password = bool(settings.redis_password.get_secret_value() or url.password)
    how = ", ".join(([f"user {user}"] if user else []) + (["password"] if password else [])) or "no credentials"
    return f"{mask_url(settings.redis_url)} ({how})"
