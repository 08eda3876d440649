"""Data sets as streamrec topics: a catalog and a time-ordered stream of events, in the wire format.

Formats:
- ``movielens``: a MovieLens "latest-small" folder (``movies.csv``, ``ratings.csv``, ``tags.csv``).
  Movies become catalog items (text from title and genres only), ratings at or above
  ``min_rating`` become clicks in timestamp order (file order breaks ties), tags become query
  events at their own timestamps.
- ``jsonl``: a folder with ``catalog.jsonl`` and ``events.jsonl``, one wire-format object per line
  (see the README's event contract); events are replayed in file order.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional


@dataclass
class Dataset:
    name: str
    catalog: list[dict]
    events: list[dict]


def load_dataset(path: str | Path, fmt: Optional[str] = None, *, min_rating: float = 0.0,
                 limit_events: Optional[int] = None) -> Dataset:
    """Load ``path`` as ``fmt`` (``movielens`` or ``jsonl``; guessed from the files when None)."""
    path = Path(path)
    if fmt is None:
        fmt = "movielens" if (path / "ratings.csv").exists() else "jsonl"
    if fmt == "movielens":
        return load_movielens(path, min_rating=min_rating, limit_events=limit_events)
    if fmt == "jsonl":
        return load_jsonl(path, limit_events=limit_events)
    raise ValueError(f"unknown data set format {fmt!r} (movielens or jsonl)")


def load_movielens(path: Path, *, min_rating: float = 0.0, limit_events: Optional[int] = None) -> Dataset:
    """MovieLens as a catalog and an event stream (see the module docstring)."""
    for name in ("movies.csv", "ratings.csv"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name} is missing: not a MovieLens folder")
    ratings = list(_movielens_ratings(path / "ratings.csv", min_rating))
    tags = list(_movielens_tags(path / "tags.csv")) if (path / "tags.csv").exists() else []
    first = min([e["timestamp"] for e in ratings + tags], default=0.0)
    catalog = []
    with (path / "movies.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            genres = [g for g in row["genres"].split("|") if g and g != "(no genres listed)"]
            catalog.append({"type": "item", "item_id": row["movieId"], "title": row["title"],
                            "description": ", ".join(genres), "category": genres[0] if genres else "",
                            "tags": [g.lower() for g in genres], "scenes": [], "available": True,
                            "timestamp": max(0.0, first - 1.0)})
    # ratings first on equal timestamps, each source in file order
    keyed = sorted([(e["timestamp"], 0, n) for n, e in enumerate(ratings)]
                   + [(e["timestamp"], 1, n) for n, e in enumerate(tags)])
    events = [(ratings, tags)[src][n] for _, src, n in keyed]
    if limit_events is not None:
        events = events[:limit_events]
    return Dataset(f"movielens:{path.name}", catalog, events)


def _movielens_ratings(path: Path, min_rating: float) -> Iterator[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh), 1):
            if float(row["rating"]) >= min_rating:
                yield {"type": "click", "event_id": f"r{n}", "user_id": row["userId"], "item_id": row["movieId"],
                       "timestamp": float(row["timestamp"])}


def _movielens_tags(path: Path) -> Iterator[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh), 1):
            text = row["tag"].strip()
            if text:
                yield {"type": "query", "event_id": f"t{n}", "user_id": row["userId"], "text": text,
                       "timestamp": float(row["timestamp"])}


def load_jsonl(path: Path, *, limit_events: Optional[int] = None) -> Dataset:
    """A folder with ``catalog.jsonl`` and ``events.jsonl`` in the wire format."""
    catalog = _read_jsonl(path / "catalog.jsonl")
    events = _read_jsonl(path / "events.jsonl")
    if limit_events is not None:
        events = events[:limit_events]
    return Dataset(f"jsonl:{path.name}", catalog, events)


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            out.append(obj)
    return out
