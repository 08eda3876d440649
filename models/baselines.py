"""Baseline recommenders for evaluation, each seeing the events in order and never the future:
``recommend`` before ``update`` for every event. Seen items are excluded by every system alike.

Every system keeps an item -> index map over the catalog (items first seen in ``update`` are
appended), scores all items as one numpy vector, sets the excluded items to -inf and takes the
top k (``np.argpartition``, then score descending, ties in catalog order). None returns an
excluded item or a duplicate, and each returns fewer than k items only when fewer are left."""

from __future__ import annotations

import abc
import random
from typing import Iterable, Sequence

import numpy as np


class Baseline(abc.ABC):
    name: str

    @abc.abstractmethod
    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        """Up to ``k`` items, none of them in ``exclude``."""

    @abc.abstractmethod
    def update(self, user: str, item: str, timestamp: float) -> None:
        """Learn from one click."""

    def add_items(self, items: Iterable[str]) -> None:
        """Items that exist (the catalog)."""


class _ItemIndex:
    """Item ids <-> dense indices in first-seen order (the catalog, then items met in updates)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, item: str) -> int:
        i = self.pos.get(item)
        if i is None:
            i = self.pos[item] = len(self.ids)
            self.ids.append(item)
        return i

    def extend(self, items: Iterable[str]) -> None:
        for item in items:
            self.add(item)

    def new_count(self, items: Iterable[str]) -> int:
        """How many distinct items of ``items`` are not indexed yet."""
        return len({i for i in items if i not in self.pos})

    def indices(self, items: Iterable[str]) -> np.ndarray:
        """Indices of the indexed ones among ``items`` (unknown ids are skipped)."""
        try:
            return np.fromiter(map(self.pos.__getitem__, items), dtype=np.intp)
        except KeyError:
            return np.fromiter((self.pos[i] for i in items if i in self.pos), dtype=np.intp)

    def to_ids(self, idx: np.ndarray) -> list[str]:
        ids = self.ids
        return [ids[i] for i in idx.tolist()]


def _grown(arr: np.ndarray, n: int) -> np.ndarray:
    """``arr`` with at least ``n`` rows: doubled and zero-filled when too short."""
    if arr.shape[0] >= n:
        return arr
    out = np.zeros((max(n, 2 * arr.shape[0]),) + arr.shape[1:], dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


_blas = None


def _one_blas_thread():
    """Context that runs BLAS on this thread only. The per-call products here are small; on a
    busy machine waking a second BLAS thread costs more than the product itself."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` best scores, best first, ties in index order; ``exclude`` indices and
    -inf scores never come back. ``scores`` is modified (pass a copy of anything you keep)."""
    if exclude is not None and len(exclude):
        scores[exclude] = -np.inf
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if k < n:
        part = np.argpartition(-scores, k - 1)[:k]
        threshold = scores[part].min()
        cand = np.flatnonzero(scores >= threshold)  # ascending index: all ties at the boundary
    else:
        cand = np.arange(n)
    best = cand[np.argsort(-scores[cand], kind="stable")[:k]]
    return best[scores[best] > -np.inf]


def _fill_by_count(ranked: np.ndarray, k: int, counts: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """``ranked`` filled up to ``k`` items with the most clicked others (``exclude`` never)."""
    if len(ranked) >= k:
        return ranked
    fill = _top_k(counts.copy(), k - len(ranked), np.concatenate([exclude, ranked]))
    return np.concatenate([ranked, fill])


class RandomBaseline(Baseline):
    """Uniform over the catalog's items not excluded: k distinct items, seeded by ``seed``."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.items = _ItemIndex()

    def add_items(self, items: Iterable[str]) -> None:
        self.items.extend(items)

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        n = len(self.items)
        excl = self.items.indices(exclude)
        # a uniform draw of k + |excluded| distinct items holds at least k allowed ones (if there are)
        draw = self.rng.choice(n, size=min(n, k + len(excl)), replace=False)
        if len(excl):
            blocked = np.zeros(n, dtype=bool)
            blocked[excl] = True
            draw = draw[~blocked[draw]]
        return self.items.to_ids(draw[:k])

    def update(self, user: str, item: str, timestamp: float) -> None:
        self.items.add(item)


class PopularityBaseline(Baseline):
    """Most clicked so far. With ``halflife_s``, each click weighs 2^((t - t_ref) / halflife_s)
    (event time t), i.e. clicks decay with that half-life; the reference time moves forward and
    the counts rescale when weights grow large, so values stay finite."""

    def __init__(self, halflife_s: float | None = None) -> None:
        self.halflife = halflife_s
        self.name = "recent_popularity" if halflife_s else "popularity"
        self.items = _ItemIndex()
        self.counts = np.zeros(0)  # per item index (may be longer than the index)
        self.ref: float | None = None

    def add_items(self, items: Iterable[str]) -> None:
        self.items.extend(items)
        self.counts = _grown(self.counts, len(self.items))

    def update(self, user: str, item: str, timestamp: float) -> None:
        i = self.items.add(item)
        self.counts = _grown(self.counts, len(self.items))
        w = 1.0
        if self.halflife:
            if self.ref is None:
                self.ref = timestamp
            e = (timestamp - self.ref) / self.halflife
            if e > 500:  # rescale to stay in float range
                self.counts *= 2.0 ** -e
                self.ref, e = timestamp, 0.0
            w = 2.0 ** e
        self.counts[i] += w

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        scores = self.counts[: len(self.items)].copy()
        return self.items.to_ids(_top_k(scores, k, self.items.indices(exclude)))


def _check_dense(name: str, n: int, max_items: int) -> None:
    """Refuse a dense n x n float32 item matrix above ``max_items`` items."""
    if n > max_items:
        raise ValueError(
            f"{name} keeps a dense {n:,} x {n:,} float32 item-item matrix: {n:,} items "
            f"would need {n * n * 4 / 1e9:.1f} GB, above max_items={max_items:,}; "
            f"skip {name} for this catalog or raise max_items")


def _grown_square(mat: np.ndarray, n: int, max_items: int) -> np.ndarray:
    """``mat`` with room for at least ``n`` items (a quarter more, at most ``max_items``), zero-filled.
    Zero pages are allocated lazily, so headroom costs memory only once used."""
    cap = mat.shape[0]
    if n <= cap:
        return mat
    new_cap = min(max_items, max(n + 64, cap + cap // 4))
    out = np.zeros((new_cap, new_cap), dtype=mat.dtype)
    out[:cap, :cap] = mat
    return out


class _DenseBaseline(Baseline):
    """A baseline over a dense item x item float32 matrix (attribute ``matrix_name``) and click
    counts per item: grown together, refused above ``max_items`` items."""

    matrix_name: str
    max_items: int

    def _grow(self, cap: int) -> None:
        """More per-item arrays to grow to ``cap`` rows (the matrix and counts are)."""

    def _reserve(self, n: int) -> None:
        mat = getattr(self, self.matrix_name)
        if n <= mat.shape[0]:
            return
        _check_dense(self.name, n, self.max_items)
        mat = _grown_square(mat, n, self.max_items)
        setattr(self, self.matrix_name, mat)
        self.count = _grown(self.count, mat.shape[0])
        self._grow(mat.shape[0])

    def add_items(self, items: Iterable[str]) -> None:
        items = list(items)
        _check_dense(self.name, len(self.items) + self.items.new_count(items), self.max_items)
        self.items.extend(items)
        self._reserve(len(self.items))

    def _index(self, item: str) -> int:
        """The item's index, room made for it first."""
        if item not in self.items.pos:
            self._reserve(len(self.items) + 1)
        return self.items.add(item)

    def _scores(self, src: np.ndarray, n: int) -> np.ndarray:
        """Scores of the first ``n`` items from the user's recent clicks ``src`` (indices)."""
        raise NotImplementedError

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        """The best scored items (only those with a positive score), then the most clicked."""
        n = len(self.items)
        excl = self.items.indices(exclude)
        recent = self.history.get(user, [])[-self.recent:]
        ranked = np.empty(0, dtype=np.intp)
        if recent:
            scores = self._scores(np.asarray(recent, dtype=np.intp), n)
            scores[scores <= 0] = -np.inf  # only items the recent clicks point to
            ranked = _top_k(scores, k, excl)
        return self.items.to_ids(_fill_by_count(ranked, k, self.count[:n], excl))


class ItemKnnBaseline(_DenseBaseline):
    """Item-to-item co-occurrence kNN: two items co-occur when the same user clicked both (each new
    click pairs with the user's last ``max_history`` clicks). A user's list scores item j by
    sum over the user's last ``recent`` clicks i of co(i, j) / sqrt(count(i) * count(j)) (cosine of
    click counts); items with no co-occurrence are filled in by popularity. Co-occurrences live in
    a dense float32 matrix, so a catalog above ``max_items`` items is refused with a ValueError."""

    name = "item_knn"
    matrix_name = "co"

    def __init__(self, recent: int = 20, max_history: int = 200, max_items: int = 20_000) -> None:
        self.recent, self.max_history, self.max_items = recent, max_history, max_items
        self.items = _ItemIndex()
        self.co = np.zeros((0, 0), dtype=np.float32)
        self.count = np.zeros(0)
        self.inv_sqrt = np.zeros(0, dtype=np.float32)  # 1 / sqrt(count), 0 where count is 0
        self.history: dict[str, list[int]] = {}

    def _grow(self, cap: int) -> None:
        self.inv_sqrt = _grown(self.inv_sqrt, cap)

    def update(self, user: str, item: str, timestamp: float) -> None:
        i = self._index(item)
        hist = self.history.setdefault(user, [])
        if hist:
            others = np.asarray(hist[-self.max_history:], dtype=np.intp)
            others, times = np.unique(others[others != i], return_counts=True)
            self.co[i, others] += times
            self.co[others, i] += times
        self.count[i] += 1
        self.inv_sqrt[i] = 1.0 / np.sqrt(self.count[i])
        hist.append(i)

    def _scores(self, src: np.ndarray, n: int) -> np.ndarray:
        inv = self.inv_sqrt[:n]
        with _one_blas_thread():
            return (inv[src] @ self.co[src, :n]) * inv


class RiverMFBaseline(Baseline):
    """Online biased matrix factorisation (``river.reco.BiasedMF``, squared loss, SGD). A click is a
    positive (``learn_one(user, item, 1.0)``) followed by ``negatives`` zeros on items drawn
    uniformly from the catalog among those the user never clicked (seeded by ``seed``).
    Parameters: ``n_factors`` latent size, ``lr`` SGD step for biases and latents, ``l2`` their L2
    penalty, ``init_sigma`` the latents' initial spread. Ranking is item_latents @ user_latent +
    item_bias over numpy mirrors of the model's item parameters (never touched items: zeros)."""

    name = "river_mf"

    def __init__(self, n_factors: int = 32, lr: float = 0.05, l2: float = 0.001, negatives: int = 4,
                 init_sigma: float = 0.1, seed: int = 0) -> None:
        from river import optim, reco

        self.model = reco.BiasedMF(
            n_factors=n_factors, bias_optimizer=optim.SGD(lr), latent_optimizer=optim.SGD(lr),
            l2_bias=l2, l2_latent=l2,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=init_sigma, seed=seed), seed=seed)
        self.negatives = negatives
        self.rng = random.Random(seed)
        self.items = _ItemIndex()
        self.latents = np.zeros((0, n_factors))
        self.biases = np.zeros(0)
        self.clicked: dict[str, set[int]] = {}

    def _fit_arrays(self) -> None:
        self.latents = _grown(self.latents, len(self.items))
        self.biases = _grown(self.biases, len(self.items))

    def add_items(self, items: Iterable[str]) -> None:
        self.items.extend(items)
        self._fit_arrays()

    def _learn(self, user: str, item: str, i: int, y: float) -> None:
        self.model.learn_one(user, item, y)
        self.latents[i] = self.model.i_latents[item]
        self.biases[i] = self.model.i_biases[item]

    def _negative(self, clicked: set[int]) -> int | None:
        n = len(self.items)
        if len(clicked) >= n:
            return None
        for _ in range(64):
            j = self.rng.randrange(n)
            if j not in clicked:
                return j
        return self.rng.choice([j for j in range(n) if j not in clicked])

    def update(self, user: str, item: str, timestamp: float) -> None:
        i = self.items.add(item)
        self._fit_arrays()
        clicked = self.clicked.setdefault(user, set())
        clicked.add(i)
        self._learn(user, item, i, 1.0)
        for _ in range(self.negatives):
            j = self._negative(clicked)
            if j is None:
                break
            self._learn(user, self.items.ids[j], j, 0.0)

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        n = len(self.items)
        scores = self.biases[:n].copy()
        u = self.model.u_latents.get(user)  # .get: asking does not create the user
        if u is not None:
            with _one_blas_thread():
                scores += self.latents[:n] @ u
        return self.items.to_ids(_top_k(scores, k, self.items.indices(exclude)))


class _Row:
    """One user's clicks as growing numpy arrays: item indices (first-click order) and counts."""

    def __init__(self) -> None:
        self.pos: dict[int, int] = {}
        self.cols = np.zeros(8, dtype=np.int32)
        self.vals = np.zeros(8, dtype=np.float32)
        self.n = 0

    def add(self, i: int) -> None:
        p = self.pos.get(i)
        if p is None:
            p = self.pos[i] = self.n
            self.n += 1
            self.cols, self.vals = _grown(self.cols, self.n), _grown(self.vals, self.n)
            self.cols[p] = i
        self.vals[p] += 1.0


class ImplicitALSBaseline(Baseline):
    """Implicit-feedback ALS (``implicit.cpu.als.AlternatingLeastSquares``, Hu et al. 2008) on the
    users x items matrix of click counts, retrained from scratch every ``retrain_every`` clicks
    (``trainings`` counts the fits). Between fits a user's factor is recomputed from all their
    current clicks (``recalculate_user``), so new clicks and new users count at once; items not
    in the last fit score 0. Before the first fit, and for users without clicks, it ranks by
    click counts. Parameters: ``factors`` latent size, ``seed`` the fit's random_state; the rest
    are implicit's defaults."""

    name = "implicit_als"

    def __init__(self, retrain_every: int = 5000, factors: int = 64, seed: int = 0) -> None:
        self.retrain_every, self.factors, self.seed = retrain_every, factors, seed
        self.fallback = PopularityBaseline()  # click counts, over the same item index
        self.items = self.fallback.items
        self.users: dict[str, _Row] = {}  # each user's clicks: item indices and counts
        self.clicks = 0
        self.trainings = 0
        self.model = None
        self.item_factors: np.ndarray | None = None

    def add_items(self, items: Iterable[str]) -> None:
        self.fallback.add_items(items)

    def update(self, user: str, item: str, timestamp: float) -> None:
        self.fallback.update(user, item, timestamp)
        i = self.items.pos[item]
        row = self.users.get(user)
        if row is None:
            row = self.users[user] = _Row()
        row.add(i)
        self.clicks += 1
        if self.clicks % self.retrain_every == 0:
            self._train()

    def _train(self) -> None:
        import scipy.sparse as sp
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        rows = list(self.users.values())
        indptr = np.cumsum([0] + [row.n for row in rows])
        cols = np.concatenate([row.cols[: row.n] for row in rows])
        vals = np.concatenate([row.vals[: row.n] for row in rows])
        matrix = sp.csr_matrix((vals, cols, indptr), shape=(len(rows), len(self.items)))
        matrix.sort_indices()
        with threadpool_limits(1, "blas"):  # implicit's advice: BLAS threads fight its own
            model = AlternatingLeastSquares(factors=self.factors, random_state=self.seed)
            model.fit(matrix, show_progress=False)
        # one user at a time: OpenMP threads for a single row cost ~100x more than they save
        # (idle threads spin and starve BLAS), so recalculate_user runs on this thread only
        model.num_threads = 1
        self.model, self.item_factors = model, model.item_factors
        _ = model.YtY  # computed once per fit here, not on the first recalculate_user
        self.trainings += 1

    def _user_factor(self, user: str) -> np.ndarray | None:
        import scipy.sparse as sp

        row = self.users.get(user)
        if self.model is None or row is None:
            return None
        trained = self.item_factors.shape[0]
        cols, vals = row.cols[: row.n], row.vals[: row.n]
        if len(self.items) > trained:  # items added since the fit are unknown to the model
            known = cols < trained
            cols, vals = cols[known], vals[known]
        if not len(cols):
            return None
        one = sp.csr_matrix((vals, cols, np.array([0, len(cols)], dtype=np.int32)), shape=(1, trained))
        return self.model.recalculate_user(0, one)

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        n = len(self.items)
        factor = self._user_factor(user)
        if factor is None:
            return self.fallback.recommend(user, k, exclude)
        scores = np.zeros(n)
        with _one_blas_thread():
            scores[: self.item_factors.shape[0]] = self.item_factors @ factor
        return self.items.to_ids(_top_k(scores, k, self.items.indices(exclude)))


class SequentialRulesBaseline(_DenseBaseline):
    """Sequential rules (Ludewig & Jannach 2018): directed transitions. When a user clicks j, each of
    their previous ``window`` clicks i adds 1 / g to rule(i, j), g the gap (1 for the click just
    before, 2 for the one before that, ...; i == j adds nothing). A list scores item j by the sum
    over the user's last ``recent`` clicks i of rule(i, j), each i weighing 1 / its position from
    the end (1 for the last click, 1/2 for the one before, ...) when ``position_weighted``: a little
    better than equal weights on MovieLens latest-small (HR@10 0.1037 against 0.1032, NDCG@10 0.0605
    against 0.0595), so on by default. Items that score 0 are filled in by popularity. Rules live
    in a dense float32 matrix, so a catalog above ``max_items`` items is refused with a ValueError."""

    name = "sequential_rules"
    matrix_name = "rules"

    def __init__(self, window: int = 10, recent: int = 3, position_weighted: bool = True,
                 max_items: int = 20_000) -> None:
        self.window, self.recent, self.max_items = window, recent, max_items
        self.position_weighted = position_weighted
        self.items = _ItemIndex()
        self.rules = np.zeros((0, 0), dtype=np.float32)
        self.count = np.zeros(0)
        self.history: dict[str, list[int]] = {}
        self.gap_weight = (1.0 / np.arange(window, 0, -1)).astype(np.float32)  # gaps window .. 1

    def update(self, user: str, item: str, timestamp: float) -> None:
        j = self._index(item)
        hist = self.history.setdefault(user, [])
        if hist:
            prev = np.asarray(hist[-self.window:], dtype=np.intp)
            w = self.gap_weight[-len(prev):]
            keep = prev != j
            np.add.at(self.rules[:, j], prev[keep], w[keep])  # add.at: a repeated i adds each time
        self.count[j] += 1
        hist.append(j)
        if len(hist) > 2 * max(self.window, self.recent):
            del hist[:-max(self.window, self.recent)]

    def _scores(self, src: np.ndarray, n: int) -> np.ndarray:
        if self.position_weighted:
            w = (1.0 / np.arange(len(src), 0, -1)).astype(np.float32)
        else:
            w = np.ones(len(src), dtype=np.float32)
        with _one_blas_thread():
            return w @ self.rules[src, :n]


class SessionKnnBaseline(Baseline):
    """V-SKNN-style user neighbours over recent items (Ludewig et al. 2021). Each user keeps their
    last ``m`` distinct clicked items (recent items); each item keeps the ``sample`` users who put
    it among their recent items most recently (an inverted index). A list for user u weighs u's
    last L <= ``n`` recent items linearly by recency (the p-th oldest p / L: the newest 1).
    Candidates are the other users in those items' inverted lists; a candidate v's similarity is
    the sum of the weights of the items it holds (as found in the lists) / sqrt(v's recent items)
    (cosine; u's own norm is the same for every candidate and left out). The ``k_neighbors`` most
    similar vote: item j scores the sum of the similarities of the neighbours holding j among
    their recent items. Items with no vote are filled in by popularity. On MovieLens latest-small
    m = 50 and n = 5 measured best (m in 20 .. 100, n in 3 .. 20); ``k_neighbors`` and ``sample``
    changed little there (610 users)."""

    name = "session_knn"

    def __init__(self, m: int = 50, n: int = 5, k_neighbors: int = 100, sample: int = 500) -> None:
        self.m, self.n, self.k_neighbors, self.sample = m, n, k_neighbors, sample
        self.items = _ItemIndex()
        self.count = np.zeros(0)
        self.users: dict[str, int] = {}
        self.recent: list[dict[int, None]] = []  # per user: recent items, oldest first
        self.recent_arr: list[np.ndarray] = []  # the same as arrays
        self.inv_norm = np.zeros(0)  # per user: 1 / sqrt(recent items)
        self.holders: list[dict[int, None]] = []  # per item: users holding it, least recent first
        self.holders_arr: list[np.ndarray | None] = []  # the same as arrays; None when stale

    def _grow_items(self) -> None:
        n = len(self.items)
        self.count = _grown(self.count, n)
        while len(self.holders) < n:
            self.holders.append({})
            self.holders_arr.append(None)

    def add_items(self, items: Iterable[str]) -> None:
        self.items.extend(items)
        self._grow_items()

    def _holders(self, i: int) -> np.ndarray:
        arr = self.holders_arr[i]
        if arr is None:
            d = self.holders[i]
            arr = self.holders_arr[i] = np.fromiter(d, dtype=np.intp, count=len(d))
        return arr

    def update(self, user: str, item: str, timestamp: float) -> None:
        j = self.items.add(item)
        self._grow_items()
        self.count[j] += 1
        u = self.users.get(user)
        if u is None:
            u = self.users[user] = len(self.recent)
            self.recent.append({})
            self.recent_arr.append(np.empty(0, dtype=np.intp))
            self.inv_norm = _grown(self.inv_norm, u + 1)
        mine = self.recent[u]
        mine.pop(j, None)
        mine[j] = None  # now the newest
        if len(mine) > self.m:
            old = next(iter(mine))
            del mine[old]
            if u in self.holders[old]:
                del self.holders[old][u]
                self.holders_arr[old] = None
        self.recent_arr[u] = np.fromiter(mine, dtype=np.intp, count=len(mine))
        self.inv_norm[u] = 1.0 / np.sqrt(len(mine))
        held = self.holders[j]
        held.pop(u, None)
        held[u] = None
        if len(held) > self.sample:
            del held[next(iter(held))]
        self.holders_arr[j] = None

    def _neighbours(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """The most similar users to ``u`` and their similarities."""
        src = self.recent_arr[u][-self.n:]
        lists = [self._holders(i) for i in src.tolist()]
        w = np.arange(1, len(src) + 1) / len(src)
        cand, inverse = np.unique(np.concatenate(lists), return_inverse=True)
        sim = np.bincount(inverse, weights=np.repeat(w, [len(a) for a in lists]), minlength=len(cand))
        sim *= self.inv_norm[cand]
        sim[cand == u] = 0.0
        if len(cand) > self.k_neighbors:
            best = np.argpartition(-sim, self.k_neighbors - 1)[: self.k_neighbors]
            cand, sim = cand[best], sim[best]
        keep = sim > 0
        return cand[keep], sim[keep]

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        n = len(self.items)
        excl = self.items.indices(exclude)
        u = self.users.get(user)
        ranked = np.empty(0, dtype=np.intp)
        if u is not None:
            nbrs, sim = self._neighbours(u)
            if len(nbrs):
                held = [self.recent_arr[v] for v in nbrs.tolist()]
                scores = np.bincount(np.concatenate(held), weights=np.repeat(sim, [len(a) for a in held]),
                                     minlength=n)
                scores[scores <= 0] = -np.inf
                ranked = _top_k(scores, k, excl)
        return self.items.to_ids(_fill_by_count(ranked, k, self.count[:n], excl))


class EaseBaseline(Baseline):
    """EASE (Steck 2019): a closed-form item-item model, refitted every ``refit_every`` clicks
    (``trainings`` counts the fits) over the items with at least ``min_clicks`` clicks (the
    ``max_items`` most clicked of them, so the inverse stays cheap). With X the binary users x
    fitted items matrix of the users' clicks, G = XᵀX + ``l2`` I and P = G⁻¹ (float64):
    B = -P / diag(P) column by column, diag(B) = 0 (kept as float32). A list scores x_u @ B, x_u
    the user's clicked items among the fitted ones, clicks after the fit included (x_u @ B is kept
    per user between fits: at most ``refit_every`` users x fitted items float32). Items that
    score 0 or less (every item outside the fit, every item before the first fit) are filled in
    by popularity."""

    name = "ease"

    def __init__(self, refit_every: int = 5000, l2: float = 500.0, min_clicks: int = 3,
                 max_items: int = 3000) -> None:
        self.refit_every, self.l2, self.min_clicks, self.max_items = refit_every, l2, min_clicks, max_items
        self.items = _ItemIndex()
        self.count = np.zeros(0)
        self.users: dict[str, _Row] = {}
        self.clicks = 0
        self.trainings = 0
        self.fit_pos = np.zeros(0, dtype=np.intp)  # item index -> row of B, -1 outside the fit
        self.fit_items = np.zeros(0, dtype=np.intp)  # row of B -> item index
        self.B = np.zeros((0, 0), dtype=np.float32)
        self.scores: dict[str, np.ndarray] = {}  # x_u @ B of the users met since the fit

    def add_items(self, items: Iterable[str]) -> None:
        self.items.extend(items)
        self.count = _grown(self.count, len(self.items))

    def update(self, user: str, item: str, timestamp: float) -> None:
        i = self.items.add(item)
        self.count = _grown(self.count, len(self.items))
        self.count[i] += 1
        row = self.users.get(user)
        if row is None:
            row = self.users[user] = _Row()
        cached = self.scores.get(user)
        if cached is not None and i not in row.pos and i < len(self.fit_pos) and self.fit_pos[i] >= 0:
            cached += self.B[self.fit_pos[i]]
        row.add(i)
        self.clicks += 1
        if self.clicks % self.refit_every == 0:
            self._fit()

    def _fit(self) -> None:
        import scipy.sparse as sp
        from scipy.linalg import lapack

        n = len(self.items)
        counts = self.count[:n]
        fit = np.flatnonzero(counts >= self.min_clicks)
        if len(fit) > self.max_items:
            fit = np.sort(fit[np.argsort(-counts[fit], kind="stable")[: self.max_items]])
        pos = np.full(n, -1, dtype=np.intp)
        pos[fit] = np.arange(len(fit))
        self.trainings += 1
        self.scores = {}
        if not len(fit):
            self.fit_items, self.fit_pos, self.B = fit, pos, np.zeros((0, 0), dtype=np.float32)
            return
        rows = list(self.users.values())
        user = np.repeat(np.arange(len(rows)), [row.n for row in rows])
        item = pos[np.concatenate([row.cols[: row.n] for row in rows])]
        keep = item >= 0
        x = sp.csr_matrix((np.ones(int(keep.sum())), (user[keep], item[keep])), shape=(len(rows), len(fit)))
        g = (x.T @ x).toarray()
        g[np.diag_indices_from(g)] += self.l2
        chol, info = lapack.dpotrf(g, lower=False, overwrite_a=True)
        if info != 0:
            raise np.linalg.LinAlgError(f"ease: Cholesky of XᵀX + l2 I failed (info {info})")
        p, info = lapack.dpotri(chol, lower=False, overwrite_c=True)
        if info != 0:
            raise np.linalg.LinAlgError(f"ease: inverse of XᵀX + l2 I failed (info {info})")
        p = np.triu(p) + np.triu(p, 1).T  # dpotri fills the upper triangle only
        b = p / (-np.diag(p))
        b[np.diag_indices_from(b)] = 0.0
        self.fit_items, self.fit_pos, self.B = fit, pos, b.astype(np.float32)

    def _user_scores(self, user: str) -> np.ndarray | None:
        """x_u @ B (None without fitted clicks): the sum of the rows of B of the user's fitted items."""
        fitted = self.scores.get(user)
        row = self.users.get(user)
        if fitted is not None or row is None or not len(self.fit_items):
            return fitted
        cols = row.cols[: row.n]
        p = self.fit_pos[cols[cols < len(self.fit_pos)]]
        p = p[p >= 0]
        if not len(p):
            return None
        if len(p) <= 64:
            fitted = self.B[p].sum(axis=0)
        else:  # a sparse row: no copy of the rows
            import scipy.sparse as sp

            x = sp.csr_matrix((np.ones(len(p), dtype=np.float32), p, [0, len(p)]), shape=(1, self.B.shape[0]))
            fitted = np.asarray(x @ self.B)[0]
        self.scores[user] = fitted
        return fitted

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        n = len(self.items)
        excl = self.items.indices(exclude)
        ranked = np.empty(0, dtype=np.intp)
        fitted = self._user_scores(user)
        if fitted is not None:
            scores = np.full(n, -np.inf, dtype=np.float32)
            scores[self.fit_items] = np.where(fitted > 0, fitted, -np.inf)
            ranked = _top_k(scores, k, excl)
        return self.items.to_ids(_fill_by_count(ranked, k, self.count[:n], excl))


class OracleBaseline(Baseline):
    """Shown the answer: for testing the scorer only."""

    name = "oracle"

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = iter(answers)

    def recommend(self, user: str, k: int, exclude: set[str]) -> list[str]:
        return [next(self.answers)]

    def update(self, user: str, item: str, timestamp: float) -> None:
        pass
