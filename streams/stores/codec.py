"""A user's whole state as one small, versioned binary record.

Layout (little-endian), schema 3::

    b"SR" u8 schema | u32 version | u8 flags | str encoder
    u32 clicks | u32 queries | f64 last_time | f32 intent_strength
    u32 applied.count | u64 applied.digest | u8 n (u32 source, i64 offset)* | u8 n (u64 event hash)*
    vec long | vec short | vec intent | u8 n (str scene, vec)* | u8 n (str category, f32 logit)*
    u8 n history (u8 kind, f64 t, str scene, str item id or text)*
    u8 n explainers (u8 kind, str label, str ref, [vec for a query])*
    seen
    u8 n | u8 F | u32 number * n | int8 features * (n * F)      (the last list's impression)

``str`` is UTF-8 bytes after their length: a u8, or 255 and a u16. ``vec`` is a u16 dimension (0: none), an
f32 scale and int8 components: cosine to the float32 vector stays above 0.9999. ``seen`` is the
sorted catalog numbers of the clicked items, as LEB128 gaps or, when smaller, a bitmap over the
catalog (so it never exceeds catalog size / 8 bytes). Click explainers keep no vector: the item
index has it. Flag 1 marks a forgotten user: only ``applied`` is kept. A schema 2 record (the
same without the impression) is read as having none.
"""

from __future__ import annotations

import functools
import struct
from typing import Iterator, Optional

import numpy as np

from models.learning import F, Impression
from models.profile import Applied, Explainer, Profile

MAGIC = b"SR"
SCHEMA = 3
READABLE = (2, 3)
FORGOTTEN = 1
_HEAD = struct.Struct("<2sBIB")


class CorruptProfile(ValueError):
    """A stored record that is not a profile this code can read; the message says why."""


_LENGTH = [bytes([n]) for n in range(255)]  # a short string's length byte


@functools.cache
def _struct(fmt: str) -> struct.Struct:
    """The little-endian ``fmt``, compiled once."""
    return struct.Struct("<" + fmt)


class _W:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def pack(self, fmt: str, *v) -> None:
        self.parts.append(_struct(fmt).pack(*v))

    def str(self, s: Optional[str]) -> None:
        b = (s or "").encode()
        if len(b) > 65535:  # cut, never inside a UTF-8 sequence
            b = b[:65535].decode("utf-8", "ignore").encode()
        self.parts.append((_LENGTH[len(b)] if len(b) < 255 else b"\xff" + struct.pack("<H", len(b))) + b)

    def vec(self, v: Optional[np.ndarray]) -> None:
        if v is None:
            self.pack("H", 0)
            return
        scale, q = quantize(v)
        self.pack("Hf", q.size, scale)
        self.parts.append(q.tobytes())


class _R:
    def __init__(self, b: bytes) -> None:
        self.b, self.i = b, 0

    def unpack(self, fmt: str):
        s = _struct(fmt)
        v = s.unpack_from(self.b, self.i)
        self.i += s.size
        return v

    def one(self, fmt: str):
        return self.unpack(fmt)[0]

    def str(self) -> str:
        b, i = self.b, self.i
        n = b[i]
        i += 1
        if n == 255:
            n = b[i] | b[i + 1] << 8
            i += 2
        if i + n > len(b):
            raise CorruptProfile("record ends early")
        self.i = i + n
        return b[i:i + n].decode()

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.b):
            raise CorruptProfile("record ends early")
        out = self.b[self.i: self.i + n]
        self.i += n
        return out

    def vec(self) -> Optional[np.ndarray]:
        dim = self.one("H")
        if not dim:
            return None
        scale = self.one("f")
        return np.frombuffer(self.take(dim), dtype=np.int8).astype(np.float32) * np.float32(scale)


def quantize(v: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """(scale, int8 components) of ``v``: its largest component maps to +-127."""
    v = np.asarray(v, dtype=np.float32)
    top = float(np.max(np.abs(v))) if v.size else 0.0
    scale = np.float32(top / 127.0 if top > 0 else 1.0)
    return scale, np.round(v / scale).astype(np.int8)


def _round(v: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if v is None:
        return None
    scale, q = quantize(v)
    return q.astype(np.float32) * scale


def canonical(p: Profile) -> None:
    """Round ``p`` (in place) to what its record holds: int8 vectors, float32 numbers. Applied
    after every event, the state right after an event is the same whether or not it was stored
    and read back in between, so lists do not depend on how events are batched."""
    scenes = list(p.scenes)
    explainers = [e for e in p.explainers if e.kind != "click" and e.vector is not None]
    vectors = [p.long, p.short, p.intent, *(p.scenes[k] for k in scenes), *(e.vector for e in explainers)]
    rounded = _round_rows([v for v in vectors if v is not None])
    out = [None if v is None else next(rounded) for v in vectors]
    p.long, p.short, p.intent = out[:3]
    p.scenes = dict(zip(scenes, out[3:3 + len(scenes)]))
    for e, v in zip(explainers, out[3 + len(scenes):]):
        e.vector = v
    p.intent_strength = float(np.float32(p.intent_strength))
    p.interest = {k: float(np.float32(v)) for k, v in p.interest.items()}


def _round_rows(vectors: list[np.ndarray]) -> Iterator[np.ndarray]:
    """:func:`_round` of each of ``vectors`` (of one length), as one array operation."""
    if len({len(v) for v in vectors}) > 1:
        return iter([_round(v) for v in vectors])
    if not vectors:
        return iter(())
    m = np.asarray(np.stack(vectors), dtype=np.float32)
    top = np.abs(m).max(axis=1).astype(np.float64) if m.shape[1] else np.zeros(len(m))
    scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)[:, None]
    return iter(np.round(m / scale).astype(np.int8).astype(np.float32) * scale)


def encode_seen(seen: set[int]) -> bytes:
    """Sorted numbers as LEB128 gaps (mode 0) or a bitmap (mode 1), whichever is smaller."""
    if not seen:
        return b"\x00" + struct.pack("<I", 0)
    nums = np.fromiter(sorted(seen), dtype=np.int64, count=len(seen))
    gaps = np.diff(nums, prepend=-1) - 1  # >= 0
    groups = np.maximum(1, (np.floor(np.log2(np.maximum(gaps, 1))).astype(np.int64) // 7) + 1)
    bitmap_len = int(nums[-1]) // 8 + 1
    if bitmap_len < int(groups.sum()):
        bits = np.zeros(bitmap_len * 8, dtype=np.uint8)
        bits[nums] = 1
        return b"\x01" + struct.pack("<I", bitmap_len) + np.packbits(bits, bitorder="little").tobytes()
    out = bytearray()
    for g in gaps.tolist():
        while g >= 0x80:
            out.append((g & 0x7F) | 0x80)
            g >>= 7
        out.append(g)
    return b"\x00" + struct.pack("<I", len(seen)) + bytes(out)


def decode_seen(r: _R) -> set[int]:
    mode, n = r.unpack("BI")
    if mode == 1:
        bits = np.unpackbits(np.frombuffer(r.take(n), dtype=np.uint8), bitorder="little")
        return set(np.flatnonzero(bits).tolist())
    if mode != 0:
        raise CorruptProfile(f"unknown seen-set mode {mode}")
    if n == 0:
        return set()
    data = np.frombuffer(r.b, dtype=np.uint8, offset=r.i)
    ends = np.flatnonzero(data < 0x80)[:n]
    if len(ends) < n:
        raise CorruptProfile("seen set ends early")
    used = int(ends[-1]) + 1
    chunk = data[:used].astype(np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    pos = np.arange(used) - np.repeat(starts, ends - starts + 1)
    vals = np.add.reduceat((chunk & 0x7F) << (7 * pos), starts)
    r.i += used
    return set((np.cumsum(vals + 1) - 1).tolist())


def encode(p: Profile, version: int, forgotten: bool = False) -> bytes:
    """The record of ``p`` at CAS ``version``; ``forgotten`` keeps only what recognises events."""
    w = _W()
    w.parts.append(_HEAD.pack(MAGIC, SCHEMA, version, FORGOTTEN if forgotten else 0))
    w.str(p.encoder)
    a = p.applied
    w.pack("IIdf", p.clicks, p.queries, p.last_time, p.intent_strength)
    w.pack("IQB", a.count, a.digest, len(a.offsets))
    for src, off in a.offsets.items():
        w.pack("Iq", src, off)
    w.pack("B", len(a.recent))
    w.pack(f"{len(a.recent)}Q", *a.recent)
    if forgotten:
        return b"".join(w.parts)
    for v in (p.long, p.short, p.intent):
        w.vec(v)
    w.pack("B", len(p.scenes))
    for name, v in p.scenes.items():
        w.str(name)
        w.vec(v)
    w.pack("B", len(p.interest))
    for name, logit in p.interest.items():
        w.str(name)
        w.pack("f", logit)
    w.pack("B", len(p.history))
    for h in p.history:
        click = h["type"] == "click"
        w.pack("Bd", 0 if click else 1, h["t"])
        w.str(h.get("scene"))
        w.str(h["item_id"] if click else h["text"])
    w.pack("B", len(p.explainers))
    for e in p.explainers:
        w.pack("B", 0 if e.kind == "click" else 1)
        w.str(e.label[:64])
        w.str(e.ref)
        if e.kind != "click":
            w.vec(e.vector)
    w.parts.append(encode_seen(p.seen))
    imp = p.shown
    n = min(len(imp.numbers), 255)
    w.pack("BB", n, imp.features.shape[1] if n else 0)
    if n:
        w.pack(f"{n}I", *imp.numbers[:n])
        w.parts.append(np.ascontiguousarray(imp.features[:n], dtype=np.int8).tobytes())
    return b"".join(w.parts)


def decode(user_id: str, b: bytes) -> tuple[Profile, bool]:
    """(profile, forgotten) from a record; raises :class:`CorruptProfile` with the reason."""
    if len(b) < _HEAD.size or b[:2] != MAGIC:
        raise CorruptProfile("not a streamrec profile record")
    try:
        _, schema, version, flags = _HEAD.unpack_from(b)
        if schema not in READABLE:
            raise CorruptProfile(f"profile schema {schema}, this code reads {', '.join(map(str, READABLE))}")
        r = _R(b)
        r.i = _HEAD.size
        p = Profile(user_id=user_id, version=version)
        p.encoder = r.str()
        p.clicks, p.queries, p.last_time, p.intent_strength = r.unpack("IIdf")
        a = Applied()
        a.count, a.digest, n = r.unpack("IQB")
        for _ in range(n):
            src, off = r.unpack("Iq")
            a.offsets[src] = off
        n = r.one("B")
        a.recent = list(r.unpack(f"{n}Q"))
        p.applied = a
        if flags & FORGOTTEN:
            return p, True
        p.long, p.short, p.intent = r.vec(), r.vec(), r.vec()
        for _ in range(r.one("B")):
            name = r.str()
            p.scenes[name] = r.vec()
        for _ in range(r.one("B")):
            name = r.str()
            p.interest[name] = float(r.one("f"))
        for _ in range(r.one("B")):
            kind, t = r.unpack("Bd")
            scene = r.str() or None
            text = r.str()
            p.history.append({"type": "click", "item_id": text, "scene": scene, "t": t} if kind == 0
                             else {"type": "query", "text": text, "scene": scene, "t": t})
        for _ in range(r.one("B")):
            kind = r.one("B")
            label, ref = r.str(), r.str()
            p.explainers.append(Explainer("click" if kind == 0 else "query", label, ref,
                                          None if kind == 0 else r.vec()))  # type: ignore[arg-type]
        p.seen = decode_seen(r)
        if schema >= 3:
            n, f = r.unpack("BB")
            if n:
                numbers = list(r.unpack(f"{n}I"))
                feats = np.frombuffer(r.take(n * f), dtype=np.int8).reshape(n, f).copy()
                p.shown = Impression(numbers, feats) if f == F else Impression()  # other features: unusable
        if r.i != len(b):
            raise CorruptProfile(f"{len(b) - r.i} bytes left over")
        return p, False
    except CorruptProfile:
        raise
    except (struct.error, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise CorruptProfile(f"unreadable profile record: {exc}") from exc


def record_version(b: Optional[bytes]) -> int:
    """The CAS version of a stored record (0 for none)."""
    return _HEAD.unpack_from(b)[2] if b and len(b) >= _HEAD.size and b[:2] == MAGIC else 0
