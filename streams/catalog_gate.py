"""Keeps the events agent from running ahead of the catalog it depends on.

A click on an item that the index does not know is dead-lettered only once the catalog is indexed
up to the end that its topic had when the click was looked at; until then the batch waits."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from streams.stores.profiles import ProfileStore

log = logging.getLogger("streamrec.catalog")


class CatalogGate:
    """``await gate()``: is every catalog partition indexed up to its end offset now?

    Args:
        end_offsets: a blocking call giving the catalog topic's end offset per partition.
        profiles: the store where the catalog agents record their indexed positions.
    """

    def __init__(self, end_offsets: Callable[[], dict[int, int]], profiles: ProfileStore) -> None:
        self.end_offsets, self.profiles = end_offsets, profiles

    async def __call__(self) -> bool:
        ends = await asyncio.get_running_loop().run_in_executor(None, self.end_offsets)
        done = await self.profiles.catalog_progress()
        behind = {p: (done.get(p, -1), end) for p, end in ends.items() if done.get(p, -1) < end - 1}
        if behind:
            log.info("catalog not indexed yet (partition: indexed, end): %s", behind)
        return not behind
