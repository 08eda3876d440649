"""A Faust Kafka transport whose consumer long-polls for ``fetch_max_wait_ms``.

faust-streaming fixes aiokafka's ``fetch_max_wait_ms`` at 1,500 ms. A broker that answers a
fetch only when that wait runs out, rather than as soon as data arrives (Tansu, the embedded
broker, does), then adds up to 1.5 s to every event's latency. The wait is a setting here.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms  # read when the consumer starts
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(driver.Transport):
    Consumer = _Consumer


class App(faust.App):
    """faust.App with the transport above; ``fetch_max_wait_ms`` is set by ``create_app``."""

    fetch_max_wait_ms: int = 1500

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)
