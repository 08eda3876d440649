"""Decode and validate raw input messages into records, or say exactly why not.

Input is JSON objects with a ``type`` field; fields are checked against the record's annotations
(no coercion: ``"3"`` is not a number), unknown fields are rejected, and limits on sizes and
timestamps come from :class:`Limits`.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

from schemas.catalog import ItemDelete, ItemUpsert
from schemas.events import Click, ForgetUser, Query
from schemas.recommendations import RecommendationRequest

EVENT_TYPES = {"click": Click, "query": Query, "forget": ForgetUser}
CATALOG_TYPES = {"item": ItemUpsert, "item_delete": ItemDelete}
REQUEST_TYPES = {"request": RecommendationRequest}
TYPE_OF = {cls: name for table in (EVENT_TYPES, CATALOG_TYPES, REQUEST_TYPES) for name, cls in table.items()}
_ID_FIELDS = {"event_id", "user_id", "item_id", "request_id", "exclude"}  # ``exclude`` holds item ids
_MAY_BE_EMPTY = {"description", "category"}
_TEXT_CONTROLS = frozenset(chr(i) for i in [*range(32), 127]) - {"\t", "\n", "\r"}


class InvalidMessage(ValueError):
    """A message that cannot be applied. ``error`` is a stable code, ``reason`` says why."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(f"{error}: {reason}")
        self.error = error
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Bounds on input; anything beyond them is rejected with the reason."""

    max_message_bytes: int = 64_000
    max_text_chars: int = 2_000
    max_id_chars: int = 256
    max_list_items: int = 64
    max_k: int = 100
    max_future_s: float = 86_400.0

    @classmethod
    def from_settings(cls, s: Any) -> "Limits":
        return cls(s.max_message_bytes, s.max_text_chars, s.max_id_chars, s.max_list_items, s.max_k, s.max_future_s)


def parse_event(raw: bytes, limits: Limits, now: float) -> Union[Click, Query, ForgetUser]:
    """Decode a message of the events topic."""
    return _parse(raw, EVENT_TYPES, limits, now)


def parse_catalog(raw: bytes, limits: Limits, now: float) -> Union[ItemUpsert, ItemDelete]:
    """Decode a message of the catalog topic."""
    return _parse(raw, CATALOG_TYPES, limits, now)


def parse_request(raw: bytes, limits: Limits, now: float) -> RecommendationRequest:
    """Decode a message of the requests topic."""
    return _parse(raw, REQUEST_TYPES, limits, now)


def to_wire(record: Any) -> dict[str, Any]:
    """A record as the plain JSON object of the wire format (``type`` first)."""
    out: dict[str, Any] = {}
    if type(record) in TYPE_OF:
        out["type"] = TYPE_OF[type(record)]
    out["schema"] = type(record)._options.namespace
    out.update(_plain(record.asdict()))
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "asdict"):
        return _plain(value.asdict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parse(raw: bytes, types: dict[str, type], limits: Limits, now: float) -> Any:
    if raw is None:
        raise InvalidMessage("empty", "message has no value")
    if len(raw) > limits.max_message_bytes:
        raise InvalidMessage("too_large", f"message is {len(raw)} bytes, limit {limits.max_message_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage("bad_encoding", f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except InvalidMessage:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage("bad_json", f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidMessage("not_object", f"expected a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in types:
        raise InvalidMessage("unknown_type", f"'type' must be one of {sorted(types)}, got {_show(kind)}")
    cls = types[kind]
    fields = _fields(cls)
    body = {k: v for k, v in data.items() if k not in ("type", "schema")}
    namespace = cls._options.namespace
    if "schema" in data and data["schema"] != namespace:
        raise InvalidMessage("unknown_schema", f"{kind} is read as {namespace}, got schema {_show(data['schema'])}")
    extra = sorted(set(body) - set(fields))
    if extra:
        raise InvalidMessage("unknown_field", f"{kind} has no field(s) {', '.join(_show(e) for e in extra[:5])}")
    values: dict[str, Any] = {}
    for name, (hint, required) in fields.items():
        if name not in body:
            if required:
                raise InvalidMessage("missing_field", f"{kind} needs field '{name}'")
            continue
        values[name] = _check(kind, name, hint, body[name], limits)
    if "timestamp" in values:
        ts = values["timestamp"]
        if ts < 0:
            raise InvalidMessage("bad_timestamp", f"timestamp {ts} is negative")
        if ts > now + limits.max_future_s:
            raise InvalidMessage("bad_timestamp", f"timestamp {ts} is more than {limits.max_future_s:.0f} s in the future")
    if "k" in values and values["k"] is not None and not 1 <= values["k"] <= limits.max_k:
        raise InvalidMessage("bad_value", f"k must be within 1..{limits.max_k}, got {values['k']}")
    if "weight" in values and not 0 < values["weight"] <= 100:
        raise InvalidMessage("bad_value", f"weight must be within (0, 100], got {values['weight']}")
    if values.get("dwell_s") is not None and values["dwell_s"] < 0:
        raise InvalidMessage("bad_value", f"dwell_s must not be negative, got {values['dwell_s']}")
    try:
        return cls(**values)
    except ValueError as exc:  # the record's own validation; the checks above should come first
        raise InvalidMessage("bad_value", f"{kind}: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise InvalidMessage("bad_json", f"{name} is not valid JSON")


@lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[Any, bool]]:
    hints = typing.get_type_hints(cls)
    defaults = cls._options.defaults
    return {name: (hints[name], name not in defaults) for name in cls._options.fields}


def _check(kind: str, name: str, hint: Any, value: Any, limits: Limits) -> Any:
    where = f"{kind}.{name}"
    if typing.get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is str:
        if not isinstance(value, str):
            raise InvalidMessage("wrong_type", f"{where} must be a string, got {_type(value)}")
        return _check_str(where, name, value, limits)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidMessage("wrong_type", f"{where} must be true or false, got {_type(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidMessage("wrong_type", f"{where} must be an integer, got {_type(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidMessage("wrong_type", f"{where} must be a number, got {_type(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise InvalidMessage("bad_value", f"{where} is out of range") from None
        if not math.isfinite(number):
            raise InvalidMessage("bad_value", f"{where} must be finite")
        return number
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise InvalidMessage("wrong_type", f"{where} must be a list, got {_type(value)}")
        if len(value) > limits.max_list_items:
            raise InvalidMessage("too_long", f"{where} has {len(value)} entries, limit {limits.max_list_items}")
        for v in value:
            if not isinstance(v, str):
                raise InvalidMessage("wrong_type", f"{where} must hold strings, got {_type(v)}")
        return [_check_str(where, name, v, limits) for v in value]
    raise TypeError(f"unsupported field type {hint!r} for {where}")  # pragma: no cover


def _check_str(where: str, name: str, value: str, limits: Limits) -> str:
    if name in _ID_FIELDS:
        if not value.strip():
            raise InvalidMessage("bad_value", f"{where} must not be empty")
        if len(value) > limits.max_id_chars:
            raise InvalidMessage("too_long", f"{where} has {len(value)} characters, limit {limits.max_id_chars}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise InvalidMessage("bad_value", f"{where} contains control characters")
    else:
        if len(value) > limits.max_text_chars:
            raise InvalidMessage("too_long", f"{where} has {len(value)} characters, limit {limits.max_text_chars}")
        if any(c in _TEXT_CONTROLS for c in value):
            raise InvalidMessage("bad_value", f"{where} contains control characters (only tab and newlines "
                                 "are allowed in text)")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidMessage("bad_encoding", f"{where} contains unpaired surrogates")
    if name not in _MAY_BE_EMPTY and not value.strip():
        raise InvalidMessage("bad_value", f"{where} must not be empty")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["InvalidMessage", "Limits", "parse_event", "parse_catalog", "parse_request", "to_wire",
           "EVENT_TYPES", "CATALOG_TYPES", "REQUEST_TYPES"]
