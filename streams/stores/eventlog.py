"""The event log (Kafka) as the tools outside the worker see it: topic administration, publishing
files of events, reading topics. Built on kafka-python."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence


@dataclass
class LogRecord:
    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    timestamp_ms: int


class KafkaEventLog:
    """kafka-python clients for one cluster, created on first use. ``options`` are further client
    keyword arguments (security: see :meth:`from_settings`)."""

    def __init__(self, bootstrap: str, client_id: str = "streamrec-tools", **options: Any) -> None:
        self.bootstrap = [h.strip() for h in bootstrap.split(",") if h.strip()]
        self.client_id = client_id
        self.options = options
        self._producer = None

    @classmethod
    def from_settings(cls, settings, client_id: str = "streamrec-tools") -> "KafkaEventLog":
        """The event log of ``settings.kafka_bootstrap``, logged in as the settings say (SASL, TLS)."""
        from streams.security import kafka_client_options

        return cls(settings.kafka_bootstrap, client_id, **kafka_client_options(settings))

    def _common(self) -> dict:
        return {"bootstrap_servers": self.bootstrap, "client_id": self.client_id, **self.options}

    def ensure_topics(self, names: Iterable[str], partitions: int, replication: int = 1,
                      timeout_s: float = 30.0) -> list[str]:
        """Create the topics that do not exist yet; returns those created."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(**self._common(), request_timeout_ms=int(timeout_s * 1000))
        try:
            existing = set(admin.list_topics())
            wanted = [n for n in dict.fromkeys(names) if n not in existing]
            if wanted:
                try:
                    admin.create_topics([NewTopic(n, partitions, replication) for n in wanted],
                                        timeout_ms=int(timeout_s * 1000))
                except TopicAlreadyExistsError:
                    pass
            return wanted
        finally:
            admin.close()

    def producer(self):
        """A shared producer: acks from all in-sync replicas, retries, ordered per partition."""
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(**self._common(), acks="all", linger_ms=5, retries=10,
                                           max_in_flight_requests_per_connection=1, enable_idempotence=False)
        return self._producer

    def publish(self, topic: str, records: Iterable[tuple[Optional[bytes], bytes, Optional[int]]],
                on_sent: Optional[Callable[[int], None]] = None) -> int:
        """Send (key, value, timestamp_ms) records and wait until the broker has them all."""
        p = self.producer()
        futures = []
        for key, value, ts in records:
            futures.append(p.send(topic, key=key, value=value, timestamp_ms=ts))
        p.flush()
        for f in futures:
            f.get(timeout=60)
        if on_sent:
            on_sent(len(futures))
        return len(futures)

    def read(self, topic: str, *, until: Callable[[list[LogRecord]], bool], timeout_s: float,
             from_beginning: bool = True) -> list[LogRecord]:
        """Read ``topic`` (all partitions, by assignment: no consumer group) until ``until(records)``
        holds or ``timeout_s`` passes; returns what was read."""
        out: list[LogRecord] = []
        for batch in self.tail(topic, timeout_s=timeout_s, from_beginning=from_beginning):
            out.extend(batch)
            if until(out):
                break
        return out

    def tail(self, topic: str | Sequence[str], *, timeout_s: float, from_beginning: bool = True) -> Iterator[list[LogRecord]]:
        """Yield batches of records of ``topic`` (one or several) as they arrive, until
        ``timeout_s`` passes."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(**self._common(), enable_auto_commit=False, group_id=None, fetch_max_wait_ms=100,
                                 max_partition_fetch_bytes=8 << 20,
                                 auto_offset_reset="earliest" if from_beginning else "latest")
        try:
            deadline = time.monotonic() + timeout_s
            tps = []
            for name in [topic] if isinstance(topic, str) else topic:
                parts = None
                while parts is None and time.monotonic() < deadline:
                    parts = consumer.partitions_for_topic(name)
                    if parts is None:
                        consumer.poll(timeout_ms=100)
                tps += [TopicPartition(name, p) for p in sorted(parts or ())]
            if not tps:
                return
            consumer.assign(tps)
            if from_beginning:
                consumer.seek_to_beginning(*tps)
            yield []  # let the caller check its condition before the first poll
            while time.monotonic() < deadline:
                polled = consumer.poll(timeout_ms=200, max_records=5000)
                batch = [LogRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                         for rs in polled.values() for r in rs]
                yield batch
        finally:
            consumer.close()

    def end_offsets(self, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
        """Per partition of ``topic``, the offset its next record will get: the high watermark of
        a fetch response. (Tansu answers ListOffsets for the latest offset with a lower number,
        and a consumer takes that answer as its high watermark, so it is not asked.)"""
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(**self._common(), enable_auto_commit=False, group_id=None, fetch_max_wait_ms=50,
                          max_partition_fetch_bytes=4096, request_timeout_ms=int(timeout_s * 1000) + 1000)
        try:
            parts = c.partitions_for_topic(topic)
            if not parts:
                c.topics()  # refresh metadata once
                parts = c.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            c.assign(tps)
            c.seek_to_beginning(*tps)  # a fetch from anywhere carries the high watermark; none is read past one record
            deadline = time.monotonic() + timeout_s
            seen: dict[int, int] = {}
            while len(seen) < len(tps):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no fetch answer for partitions {sorted({p.partition for p in tps} - set(seen))} "
                                       f"of {topic} in {timeout_s:.0f} s")
                c.poll(timeout_ms=100, max_records=1, update_offsets=False)
                for tp in tps:
                    hw = c.highwater(tp)
                    if hw is not None:
                        seen[tp.partition] = int(hw)
        finally:
            c.close()
        return seen

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


def all_topics(settings) -> Sequence[str]:
    """Every topic a worker reads or writes."""
    return (settings.topic_events, settings.topic_catalog, settings.topic_requests,
            settings.topic_recommendations, settings.topic_deadletter)
