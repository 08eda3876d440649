"""The item index: item vectors and attributes, searched by cosine similarity.

``open_item_index(uri)`` picks the implementation: ``http(s)://host:port`` or a ``.db`` file
(Milvus: standalone, cluster or Milvus Lite), ``memory://`` (numpy, for unit tests and trials).
Methods are synchronous; agents call them in an executor.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Collection, Optional, Sequence

import numpy as np

from models.ranking import Candidate


@dataclass
class ItemRow:
    item_id: str
    vector: np.ndarray
    title: str = ""
    category: str = ""
    scenes: Sequence[str] = field(default_factory=tuple)
    available: bool = True
    timestamp: float = 0.0
    no: int = -1  # catalog number


class ItemIndex(abc.ABC):
    """Where item vectors live."""

    dim: int

    @abc.abstractmethod
    def upsert(self, rows: Sequence[ItemRow]) -> None:
        """Insert or replace items (by ``item_id``)."""

    @abc.abstractmethod
    def delete(self, item_ids: Sequence[str]) -> None:
        """Remove items; unknown ids are ignored."""

    @abc.abstractmethod
    def get(self, item_ids: Sequence[str]) -> dict[str, Candidate]:
        """The stored items among ``item_ids``, with vectors (similarity 0)."""

    @abc.abstractmethod
    def search(self, vectors: np.ndarray, limit: int, categories: Sequence[str] = (),
               exclude: Collection[int] = ()) -> list[list[Candidate]]:
        """For each row of ``vectors`` (shape ``(n, dim)``, unit length), the ``limit`` available
        items of highest cosine similarity, best first, with their catalog numbers. Vectors and
        attributes may be left out (``vector=None``): :meth:`get` has them. ``categories``: only
        items of these; ``exclude``: never the items of these catalog numbers (for every row)."""

    @abc.abstractmethod
    def count(self) -> int:
        """Items stored."""

    def close(self) -> None:
        """Release connections."""


class MemoryItemIndex(ItemIndex):
    """Exact search over a numpy matrix (rebuilt after a change), ties broken by item id."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._rows: dict[str, ItemRow] = {}
        self._built: Optional[tuple[list[ItemRow], np.ndarray, np.ndarray, np.ndarray]] = None

    def upsert(self, rows: Sequence[ItemRow]) -> None:
        for r in rows:
            self._rows[r.item_id] = r
        self._built = None

    def delete(self, item_ids: Sequence[str]) -> None:
        for i in item_ids:
            self._rows.pop(i, None)
        self._built = None

    def get(self, item_ids: Sequence[str]) -> dict[str, Candidate]:
        return {i: _candidate(self._rows[i], 0.0) for i in item_ids if i in self._rows}

    def _matrix(self) -> tuple[list[ItemRow], np.ndarray, np.ndarray, np.ndarray]:
        """Available rows, their vectors, catalog numbers and rank by item id."""
        if self._built is None:
            rows = [r for r in self._rows.values() if r.available]
            matrix = np.stack([r.vector for r in rows]).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
            by_id = np.empty(len(rows), dtype=np.int64)
            by_id[np.argsort(np.array([r.item_id for r in rows], dtype=object), kind="stable")] = np.arange(len(rows))
            self._built = (rows, matrix, np.array([r.no for r in rows], dtype=np.int64), by_id)
        return self._built

    def search(self, vectors: np.ndarray, limit: int, categories: Sequence[str] = (),
               exclude: Collection[int] = ()) -> list[list[Candidate]]:
        rows, matrix, nos, by_id = self._matrix()
        allowed = np.ones(len(rows), dtype=bool)
        if categories:
            allowed &= np.array([r.category in categories for r in rows], dtype=bool)
        if exclude:
            allowed &= ~np.isin(nos, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
        if not allowed.any() or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        sims = np.asarray(vectors, dtype=np.float32) @ matrix.T  # (n, items)
        sims[:, ~allowed] = -np.inf
        n_allowed = int(allowed.sum())
        out = []
        for row in sims:
            take = min(limit, n_allowed)
            if take <= 0:
                out.append([])
                continue
            if take < len(row):
                threshold = row[np.argpartition(-row, take - 1)[take - 1]]
                cand = np.flatnonzero(row >= threshold)  # every tie at the boundary
            else:
                cand = np.flatnonzero(row > -np.inf)
            order = cand[np.lexsort((by_id[cand], -row[cand]))][:take]
            out.append([_candidate(rows[j], float(row[j])) for j in order])
        return out

    def count(self) -> int:
        return len(self._rows)


def _candidate(r: ItemRow, similarity: float) -> Candidate:
    return Candidate(r.item_id, similarity, r.vector, r.title, r.category, tuple(r.scenes), r.available, r.no)


class EncoderMismatch(ValueError):
    """The index holds vectors of another encoder than the one given: they must never be mixed."""


__all__ = ["EncoderMismatch", "ItemIndex", "ItemRow", "MemoryItemIndex"]
