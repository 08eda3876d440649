"""Hostile input, made by hypothesis: messages for every input topic that the worker must reject,
each a valid message with one fault (or bytes that were never one). The unit tests check that
every one is rejected with a reason; the integration tests push them through a real worker."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Optional, Union

from hypothesis import strategies as st

from schemas.validate import CATALOG_TYPES, EVENT_TYPES, REQUEST_TYPES, Limits, _fields

TOPIC_TYPES = {"events": EVENT_TYPES, "catalog": CATALOG_TYPES, "requests": REQUEST_TYPES}
ID_FIELDS = {"event_id", "user_id", "item_id", "request_id"}
LIST_FIELDS = {"tags", "scenes", "categories", "exclude"}
UNKNOWN_ITEM = "no-such-item-"  # click targets with this prefix are never in a test catalog


@dataclass(frozen=True)
class Hostile:
    """One message to send: the topic role, key, value and the fault it carries."""

    topic: str
    key: Optional[bytes]
    value: Optional[bytes]
    fault: str


def _plain_hint(hint):
    if typing.get_origin(hint) is Union:
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


_words = st.text("abcdefghijklmnopqrstuvwxyz -", min_size=1, max_size=12).filter(str.strip)
_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_:", min_size=1, max_size=24)


@st.composite
def valid_dict(draw, topic: str, now: float, items: tuple[str, ...]) -> dict:
    """A valid message of ``topic`` (a click names one of ``items``)."""
    kind = draw(st.sampled_from(sorted(TOPIC_TYPES[topic])))
    ts = draw(st.floats(min_value=now - 86_400 * 365, max_value=now))
    base = {"type": kind, "timestamp": ts}
    if kind in ("click", "query", "forget"):
        base.update(event_id="ev-" + draw(_ids), user_id="u-" + draw(_ids))
    if kind == "click":
        base["item_id"] = draw(st.sampled_from(items))
        base["weight"] = draw(st.floats(min_value=0.1, max_value=5.0))
    elif kind == "query":
        base["text"] = draw(_words)
    elif kind in ("item", "item_delete"):
        base["item_id"] = "it-" + draw(_ids)
        if kind == "item":
            base.update(title=draw(_words), tags=draw(st.lists(_words, max_size=3)))
    elif kind == "request":
        base.update(request_id="r-" + draw(_ids), user_id="u-" + draw(_ids), k=draw(st.integers(1, 20)))
    return base


def _wrong_value(hint, optional: bool):
    """JSON values that are not of type ``hint`` (and not null when the field may be null)."""
    others = {
        str: st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
        | st.lists(st.integers(), max_size=3) | st.dictionaries(_words, st.integers(), max_size=2),
        float: st.text(max_size=10) | st.booleans() | st.lists(st.floats(allow_nan=False), max_size=2)
        | st.dictionaries(_words, st.integers(), max_size=2),
        int: st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)) | st.text(max_size=5)
        | st.booleans() | st.lists(st.integers(), max_size=2),
        bool: st.integers() | st.text(max_size=5) | st.sampled_from(["true", "false", 0, 1])
        | st.lists(st.booleans(), max_size=2),
    }
    if typing.get_origin(hint) is list:
        wrong = (st.text(max_size=10) | st.integers() | st.dictionaries(_words, _words, max_size=2)
                 | st.lists(st.integers() | st.booleans() | st.none(), min_size=1, max_size=3))
    else:
        wrong = others[hint]
    return wrong if optional else wrong | st.none()


def _control(draw, text: str, allowed_in_text: bool) -> str:
    ctl = draw(st.sampled_from([chr(i) for i in [*range(32), 127] if not (allowed_in_text and chr(i) in "\t\n\r")]))
    at = draw(st.integers(0, len(text)))
    return text[:at] + ctl + text[at:]


@st.composite
def hostile(draw, limits: Limits, now: float, items: tuple[str, ...]) -> Hostile:
    """One hostile message for one of the three input topics."""
    topic = draw(st.sampled_from(sorted(TOPIC_TYPES)))
    msg = draw(valid_dict(topic, now, items))
    cls = TOPIC_TYPES[topic][msg["type"]]
    fields = _fields(cls)
    names = sorted(k for k in msg if k in fields)
    key = draw(st.none() | st.binary(max_size=40) | st.just(str(msg.get("user_id", msg.get("item_id", ""))).encode()))
    faults = ["not_utf8", "broken_json", "not_object", "empty", "wrong_type", "missing_field", "extra_field",
              "unknown_type", "wrong_schema", "huge_text", "huge_id", "huge_message", "negative_timestamp",
              "future_timestamp", "non_finite", "control_chars", "empty_id", "lone_surrogate", "deep_nesting"]
    if topic == "events" and msg["type"] == "click":
        faults += ["unknown_item", "bad_weight"]
    if any(f in LIST_FIELDS for f in fields):
        faults.append("huge_list")
    if topic == "requests":
        faults.append("bad_k")
    fault = draw(st.sampled_from(faults))

    def enc(d) -> bytes:
        return json.dumps(d, ensure_ascii=False).encode()

    value: Optional[bytes]
    if fault == "not_utf8":  # bytes that never occur in UTF-8, anywhere in the message
        raw = enc(msg)
        at = draw(st.integers(0, len(raw)))
        value = raw[:at] + bytes([draw(st.sampled_from([0xC0, 0xC1, *range(0xF5, 0x100)]))]) + raw[at:]
    elif fault == "broken_json":
        raw = enc(msg)
        how = draw(st.sampled_from(["truncate", "trailing", "quotes", "bare"]))
        if how == "truncate":  # a proper prefix of an object is never JSON
            value = raw[:draw(st.integers(1, len(raw) - 1))]
        elif how == "trailing":
            value = raw + draw(st.sampled_from([b"x", b",", b"}", b"{}", b" ]"]))
        elif how == "quotes":
            value = raw.replace(b'"', b"'")
        else:
            value = draw(st.sampled_from([b"{type: click}", b"NaN", b"{\"a\":}", b"[1,]", b"{,}", b"\"\\x\""]))
    elif fault == "not_object":
        value = enc(draw(st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                         | st.lists(st.integers(), max_size=5) | st.just([msg])))
    elif fault == "empty":
        value = draw(st.sampled_from([None, b"", b" ", b"\n"]))
    elif fault == "wrong_type":
        name = draw(st.sampled_from(names))
        hint, optional = _plain_hint(fields[name][0])
        msg[name] = draw(_wrong_value(hint, optional))
        value = enc(msg)
    elif fault == "missing_field":
        required = ["type", *(n for n in names if fields[n][1])]
        del msg[draw(st.sampled_from(required))]
        value = enc(msg)
    elif fault == "extra_field":
        extra = draw(_words.filter(lambda w: w not in fields and w not in ("type", "schema")))
        msg[extra] = draw(st.integers() | _words | st.none())
        value = enc(msg)
    elif fault == "unknown_type":
        others = {t for table in TOPIC_TYPES.values() for t in table} - set(TOPIC_TYPES[topic])
        msg["type"] = draw(st.sampled_from(sorted(others)) | _words.filter(lambda w: w not in TOPIC_TYPES[topic])
                           | st.integers() | st.none())
        value = enc(msg)
    elif fault == "wrong_schema":
        msg["schema"] = draw(st.sampled_from(["streamrec.v2.Click", "streamrec.v1.Nope", ""]) | _words)
        value = enc(msg)
    elif fault == "huge_text":
        text_fields = sorted(n for n in fields if n not in ID_FIELDS and _plain_hint(fields[n][0])[0] is str)
        # a record without text (forget, item_delete) gets a huge field it does not have
        name = draw(st.sampled_from(text_fields)) if text_fields else "note"
        msg[name] = "w" * (limits.max_text_chars + draw(st.integers(1, 20_000)))
        value = enc(msg)
    elif fault == "huge_id":
        name = draw(st.sampled_from([n for n in names if n in ID_FIELDS]))
        msg[name] = "i" * (limits.max_id_chars + draw(st.integers(1, 5_000)))
        value = enc(msg)
    elif fault == "huge_message":
        value = enc({**msg, "pad": "p" * (limits.max_message_bytes + draw(st.integers(0, 20_000)))})
    elif fault == "huge_list":
        name = draw(st.sampled_from(sorted(LIST_FIELDS & set(fields))))
        msg[name] = [f"x{i}" for i in range(limits.max_list_items + draw(st.integers(1, 2_000)))]
        value = enc(msg)
    elif fault == "negative_timestamp":
        msg["timestamp"] = draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
        value = enc(msg)
    elif fault == "future_timestamp":  # an hour past the limit: still future when the worker reads it
        msg["timestamp"] = draw(st.floats(min_value=now + limits.max_future_s + 3600, max_value=1e300))
        value = enc(msg)
    elif fault == "non_finite":
        text = enc({**msg, "timestamp": 0}).decode()
        value = text.replace('"timestamp": 0', '"timestamp": ' + draw(st.sampled_from(
            ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]))).encode()
    elif fault == "control_chars":
        name = draw(st.sampled_from([n for n in names if _plain_hint(fields[n][0])[0] is str]))
        msg[name] = _control(draw, msg[name], allowed_in_text=name not in ID_FIELDS)
        value = enc(msg)
    elif fault == "empty_id":
        msg[draw(st.sampled_from([n for n in names if n in ID_FIELDS]))] = draw(st.sampled_from(["", " ", "\t "]))
        value = enc(msg)
    elif fault == "lone_surrogate":
        name = draw(st.sampled_from([n for n in names if _plain_hint(fields[n][0])[0] is str]))
        msg[name] = msg[name] + "\ud800"
        value = json.dumps(msg, ensure_ascii=True).encode()  # "\ud800" escaped: valid UTF-8 bytes
    elif fault == "deep_nesting":
        depth = draw(st.integers(5_000, 20_000))
        value = enc({**msg, "timestamp": 0}).replace(b'"timestamp": 0', b'"timestamp": ' + b"[" * depth + b"]" * depth)
    elif fault == "unknown_item":
        msg["item_id"] = UNKNOWN_ITEM + draw(_ids)
        value = enc(msg)
    elif fault == "bad_weight":
        msg["weight"] = draw(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)
                             | st.floats(min_value=100.0, exclude_min=True, allow_infinity=False))
        value = enc(msg)
    elif fault == "bad_k":
        msg["k"] = draw(st.integers(max_value=0) | st.integers(min_value=limits.max_k + 1))
        value = enc(msg)
    else:  # pragma: no cover
        raise AssertionError(fault)
    if value is None and key is None:  # Kafka has no message without both (a tombstone has a key)
        key = b""
    return Hostile(topic, key, value, fault)
