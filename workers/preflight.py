"""A starting worker's checks that Kafka, Redis and Milvus let it in, before the encoder loads.

Rejected credentials (or a failed TLS check) end the worker at once with one line naming the
service, its masked address and the cause; an unreachable service is tried again, with backoff,
until ``startup_timeout_s``. Client libraries do not tell these apart on their own: on a wrong SASL
password kafka-python retries until its bootstrap timeout, and aiokafka logs the
``SaslAuthenticationFailed`` and raises a bare ``KafkaConnectionError``. So each check opens one
connection itself and sorts what that connection raises."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from streams.retry import Backoff
from streams.security import describe_kafka, describe_redis, redis_options
from streams.settings import Settings, mask_url


class ServiceError(RuntimeError):
    """A service rejected the settings or stayed unreachable: a one-line message without secrets."""


class Rejected(Exception):
    """An answer no retry will change (the message says what was rejected and why)."""


@dataclass(frozen=True)
class Probe:
    """One service's check: ``check(timeout_s)`` returns when the service let us in, raises
    :class:`Rejected` for a final no, anything else for a try-again."""

    service: str
    address: str
    check: Callable[[float], Awaitable[None]]
    hint: str = ""  # added to the message of a service still unreachable at the deadline


def cause(exc: BaseException) -> str:
    """``Type: message`` on one line (the type once, though some messages repeat it)."""
    text, name = str(exc).strip(), type(exc).__name__
    text = text if name in text else f"{name}: {text}" if text else name
    return text.splitlines()[0]


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` that ``exc`` is or was raised from, if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _tls_rejected(exc: BaseException, hint: str) -> Rejected | None:
    err = _tls_error(exc)
    if err is None:
        return None
    what = "failed the TLS certificate check" if isinstance(err, ssl.SSLCertVerificationError) \
        else "failed the TLS handshake"
    return Rejected(f"{what}: {cause(err)} ({hint})")


def kafka_probe(settings: Settings) -> Probe:
    """Open one connection to a bootstrap broker with aiokafka and the exact options the Faust app
    gets (SASL login included)."""

    async def check(timeout_s: float) -> None:
        import aiokafka.errors as errors
        from aiokafka.conn import create_conn
        from aiokafka.protocol.metadata import MetadataRequest
        from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

        from streams.app import broker_credentials

        auth = credentials_to_aiokafka_auth(broker_credentials(settings))
        last: BaseException = ConnectionError("no bootstrap server")
        for server in [h.strip() for h in settings.kafka_bootstrap.split(",") if h.strip()]:
            host, _, port = server.rpartition(":") if ":" in server else (server, "", "9092")
            try:
                conn = await create_conn(host.strip("[]"), int(port), client_id="streamrec-preflight",
                                         request_timeout_ms=int(timeout_s * 1000), **auth)
            except (errors.SaslAuthenticationFailed, errors.AuthenticationFailedError) as exc:
                raise Rejected(f"rejected the credentials: {cause(exc)}") from None
            except (errors.UnsupportedSaslMechanismError, errors.AuthenticationMethodNotSupported) as exc:
                raise Rejected(f"does not offer SASL {settings.kafka_sasl_mechanism}: {cause(exc)}") from None
            except errors.IllegalSaslStateError:
                raise Rejected("takes no SASL login on this listener (IllegalSaslStateError): is it a "
                               "PLAINTEXT or SSL listener? see kafka_security_protocol") from None
            except Exception as exc:  # noqa: BLE001 - sorted below
                tls = _tls_rejected(exc, "see kafka_ssl_cafile, kafka_ssl_check_hostname, and that the "
                                         "listener speaks TLS")
                if tls is not None:
                    raise tls from None
                last = exc
                continue
            try:  # a SASL listener answers this only after a login, a TLS one only after a handshake
                await conn.send(MetadataRequest([]))
            except Exception as exc:  # noqa: BLE001
                last = exc
                continue
            finally:
                conn.close()
            return
        raise last

    return Probe("Kafka", describe_kafka(settings), check,
                 "check kafka_bootstrap, and that kafka_security_protocol is the listener's")


def redis_probe(settings: Settings) -> Probe:
    """PING with the store's URL and options."""

    async def check(timeout_s: float) -> None:
        from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError

        from streams.stores.redis_profiles import connect

        r = connect(settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                    **redis_options(settings))
        try:
            await r.ping()
        except AuthenticationError as exc:
            if getattr(exc, "status_code", None) == "NOAUTH" or "NOAUTH" in str(exc):
                raise Rejected("requires a password and none was given (NOAUTH): set redis_password "
                               "(and redis_username for an ACL user)") from None
            raise Rejected(f"rejected the credentials: {getattr(exc, 'status_code', None) or 'AUTH'} {exc}") from None
        except (AuthorizationError, NoPermissionError) as exc:
            raise Rejected(f"denied the user: {cause(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - TLS failures are final, the rest are retried
            tls = _tls_rejected(exc, "see redis_ssl_cafile, and that the server speaks TLS")
            if tls is not None:
                raise tls from None
            raise
        finally:
            await r.aclose()

    return Probe("Redis", describe_redis(settings), check)


_MILVUS_AUTH = re.compile(r"auth|unauthenticated|permission denied|token|password", re.IGNORECASE)


def milvus_auth_error(exc: BaseException) -> Optional[BaseException]:
    """The error in ``exc``'s chain (itself or a cause) where Milvus or gRPC says the token was not
    accepted; ``None`` if none is. pymilvus turns a refused login into "Fail connecting ... illegal
    connection params or server unavailable", with gRPC's UNAUTHENTICATED as its cause."""
    from streams.retry import error_chain, error_code

    for e in error_chain(exc):
        if getattr(error_code(e), "name", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return e
        if _MILVUS_AUTH.search(str(getattr(e, "message", "")) or str(e)):
            return e
    return None


def milvus_probe(settings: Settings) -> Probe:
    """List collections with the settings' token."""

    async def check(timeout_s: float) -> None:
        def run() -> None:
            from streams.stores.milvus_items import milvus_client

            client = milvus_client(settings.milvus_uri, settings.milvus_token.get_secret_value(), timeout=timeout_s)
            try:
                client.list_collections(timeout=timeout_s)
            finally:
                client.close()

        try:
            await asyncio.to_thread(run)
        except Exception as exc:  # noqa: BLE001 - sorted here
            refused = milvus_auth_error(exc)
            if refused is not None:
                details = getattr(refused, "details", None)
                said = details() if callable(details) else cause(refused)
                raise Rejected(f"rejected the token: {said}") from None
            tls = _tls_rejected(exc, "see the https:// certificate")
            if tls is not None:
                raise tls from None
            raise

    token = "token" if settings.milvus_token.get_secret_value() else "no token"
    return Probe("Milvus", f"{mask_url(settings.milvus_uri)} ({token})", check)


def probes(settings: Settings) -> list[Probe]:
    """The services a worker of ``settings`` talks to over the network."""
    out = [kafka_probe(settings)]
    if not settings.redis_url.startswith("memory://"):
        out.append(redis_probe(settings))
    if settings.milvus_uri.startswith(("http://", "https://", "tcp://")):  # not memory:// or a local .db file
        out.append(milvus_probe(settings))
    return out


async def wait_until_up(probe: Probe, deadline: float, backoff: Backoff, attempt_s: float = 5.0) -> None:
    """Run ``probe`` until it passes; :class:`ServiceError` when it is rejected, or still failing
    at ``deadline`` (``time.monotonic()``); at least one try is made."""
    start, attempt = time.monotonic(), 0
    while True:
        timeout = max(min(attempt_s, deadline - time.monotonic()), 1.0)
        try:
            await asyncio.wait_for(probe.check(timeout), timeout + 1.0)
            return
        except Rejected as exc:
            raise ServiceError(f"{probe.service} at {probe.address} {exc}") from None
        except Exception as exc:  # noqa: BLE001 - unreachable (so far)
            last = exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServiceError(f"{probe.service} at {probe.address} not reachable after "
                               f"{time.monotonic() - start:.0f} s (startup_timeout_s): {cause(last)}"
                               + (f" ({probe.hint})" if probe.hint else ""))
        await asyncio.sleep(min(backoff.delay(attempt), left))
        attempt += 1


async def preflight(settings: Settings, backoff: Backoff = Backoff(base_s=0.2, cap_s=2.0)) -> None:
    """Check every service at once; raises :class:`ServiceError` for the first that fails."""
    deadline = time.monotonic() + settings.startup_timeout_s
    await asyncio.gather(*(wait_until_up(p, deadline, backoff) for p in probes(settings)))
