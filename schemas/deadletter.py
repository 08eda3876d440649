"""Rejected input, with where it came from and why."""

from __future__ import annotations

from typing import Optional

import faust


class DeadLetter(faust.Record, namespace="streamrec.v1.DeadLetter"):
    """``value_b64`` holds the original bytes exactly as received."""

    source_topic: str
    partition: int
    offset: int
    value_b64: str
    error: str  # machine-readable error code
    reason: str  # human-readable reason
    produced_time: float
    key_b64: Optional[str] = None
