"""Decode and validate raw input messages into records, or say exactly why not.

Input is JSON objects with a ``type`` field. Each record has a strict pydantic model generated
from its annotations (:func:`wire_model`: no coercion, ``"3"`` is not a number; unknown fields
are refused); limits on sizes and timestamps come from :class:`Limits`, in the validation
context. Every failure becomes one of :data:`CODES` with a reason that names the field.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, Optional, Union

import annotated_types
import pydantic
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

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
CODES = ("empty", "too_large", "bad_encoding", "bad_json", "not_object", "unknown_type", "unknown_schema",
         "unknown_field", "missing_field", "wrong_type", "bad_value", "too_long", "bad_timestamp")


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
    try:
        model = wire_model(cls).model_validate(data, context=(limits, now))
    except ValidationError as exc:
        raise _invalid(kind, cls, exc.errors(include_url=False)) from None
    values = {name: getattr(model, name) for name in _fields(cls)}
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


# -- the wire models: pydantic's strict mode, generated from the records' annotations ------------

# Bounds that do not depend on the settings; they also show in the JSON Schemas. ``timestamp``
# breaks its bound with ``bad_timestamp``, every other field with ``bad_value``.
_BOUNDS: dict[str, Any] = {"timestamp": annotated_types.Ge(0), "weight": annotated_types.Interval(gt=0, le=100),
                           "dwell_s": annotated_types.Ge(0)}
_BOUND_TEXT = {"timestamp": "timestamp {v} is negative", "weight": "weight must be within (0, 100], got {v}",
               "dwell_s": "dwell_s must not be negative, got {v}"}


def _strict(hint: Any, name: str) -> Any:
    """``hint`` as a strict pydantic type: floats finite, records as their wire models."""
    if typing.get_origin(hint) is Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return Optional[_strict(inner[0], name)]
    if typing.get_origin(hint) is list:
        return list[_strict(typing.get_args(hint)[0], name)]
    if hasattr(hint, "_options"):
        return wire_model(hint)
    if hint is float:
        bound = [_BOUNDS[name]] if name in _BOUNDS else []
        return Annotated[float, pydantic.Field(allow_inf_nan=False), *bound]
    return hint


@lru_cache(maxsize=None)
def wire_model(cls: type) -> type[pydantic.BaseModel]:
    """The strict pydantic model of one record as JSON on the wire: ``type`` (input records),
    ``schema`` (optional on input), then the record's fields; unknown keys are refused."""
    ns = cls._options.namespace
    defs: dict[str, Any] = {}
    if cls in TYPE_OF:
        defs["type"] = (Literal[TYPE_OF[cls]], ...)
    defs["schema_"] = (Literal[ns], pydantic.Field(ns, alias="schema", description="optional on input"))
    for name, (hint, required) in _fields(cls).items():
        default = ... if required else cls._options.defaults[name]
        defs[name] = (_strict(hint, name), pydantic.Field(default))
    validators = {}
    if cls in TYPE_OF:  # input: the limits and the clock come in the validation context
        strings = [n for n, (h, _) in _fields(cls).items() if _is_text(h)]
        validators["check_strings"] = pydantic.field_validator(*strings)(_check_strings)
        if "timestamp" in defs:
            validators["check_timestamp"] = pydantic.field_validator("timestamp")(_check_future)
        if "k" in defs:
            validators["check_k"] = pydantic.field_validator("k")(_check_k)
    config = pydantic.ConfigDict(strict=True, extra="forbid", title=cls.__name__,
                                 json_schema_extra={"description": (cls.__doc__ or "").strip()})
    return pydantic.create_model(cls.__name__, __config__=config, __validators__=validators, **defs)


def _is_text(hint: Any) -> bool:
    if typing.get_origin(hint) in (Union, list):
        return any(_is_text(a) for a in typing.get_args(hint))
    return hint is str


def _context(info: pydantic.ValidationInfo) -> tuple[Limits, float]:
    return info.context if info.context is not None else (Limits(), float("inf"))


def _check_strings(cls: Any, value: Any, info: pydantic.ValidationInfo) -> Any:
    limits, _ = _context(info)
    name = info.field_name
    if isinstance(value, list):
        if len(value) > limits.max_list_items:
            raise _fail("too_long", f"{{where}} has {len(value)} entries, limit {limits.max_list_items}")
        for v in value:
            _check_str(name, v, limits)
    elif value is not None:
        _check_str(name, value, limits)
    return value


def _check_future(cls: Any, value: float, info: pydantic.ValidationInfo) -> float:
    limits, now = _context(info)
    if value > now + limits.max_future_s:
        raise _fail("bad_timestamp", f"timestamp {value} is more than {limits.max_future_s:.0f} s in the future")
    return value


def _check_k(cls: Any, value: Optional[int], info: pydantic.ValidationInfo) -> Optional[int]:
    limits, _ = _context(info)
    if value is not None and not 1 <= value <= limits.max_k:
        raise _fail("bad_value", f"k must be within 1..{limits.max_k}, got {value}")
    return value


def _fail(error: str, reason: str) -> PydanticCustomError:
    """An error with streamrec's code as its type; ``{where}`` in the reason becomes ``kind.field``."""
    return PydanticCustomError(error, "{reason}", {"reason": reason})


def _check_str(name: str, value: str, limits: Limits) -> None:
    if name in _ID_FIELDS:
        if not value.strip():
            raise _fail("bad_value", "{where} must not be empty")
        if len(value) > limits.max_id_chars:
            raise _fail("too_long", f"{{where}} has {len(value)} characters, limit {limits.max_id_chars}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise _fail("bad_value", "{where} contains control characters")
    else:
        if len(value) > limits.max_text_chars:
            raise _fail("too_long", f"{{where}} has {len(value)} characters, limit {limits.max_text_chars}")
        if any(c in _TEXT_CONTROLS for c in value):
            raise _fail("bad_value", "{where} contains control characters (only tab and newlines are allowed in text)")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise _fail("bad_encoding", "{where} contains unpaired surrogates")
    if name not in _MAY_BE_EMPTY and not value.strip():
        raise _fail("bad_value", "{where} must not be empty")


# pydantic's error types, as streamrec's codes and reasons
_WRONG_TYPE = {"string_type": "must be a string", "float_type": "must be a number", "int_type": "must be an integer",
               "bool_type": "must be true or false", "list_type": "must be a list"}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _invalid(kind: str, cls: type, errors: list[dict]) -> InvalidMessage:
    """The first error that matters, as :class:`InvalidMessage`: the ``schema`` key first, then
    unknown fields (all named), then the fields in their order."""
    schema = [e for e in errors if e["loc"][:1] == ("schema",)]
    if schema:
        return InvalidMessage("unknown_schema", f"{kind} is read as {cls._options.namespace}, "
                              f"got schema {_show(schema[0]['input'])}")
    extra = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if extra:
        return InvalidMessage("unknown_field", f"{kind} has no field(s) {', '.join(_show(x) for x in extra[:5])}")
    e = errors[0]
    name, value, kind_of = str(e["loc"][0]), e["input"], e["type"]
    where = f"{kind}.{name}"
    if kind_of == "missing":
        return InvalidMessage("missing_field", f"{kind} needs field '{name}'")
    if kind_of in _WRONG_TYPE:
        if kind_of == "float_type" and isinstance(value, int) and not isinstance(value, bool):
            return InvalidMessage("bad_value", f"{where} is out of range")  # an integer beyond any float
        if len(e["loc"]) > 1:  # an entry of a list
            return InvalidMessage("wrong_type", f"{where} must hold strings, got {_type(value)}")
        return InvalidMessage("wrong_type", f"{where} {_WRONG_TYPE[kind_of]}, got {_type(value)}")
    if kind_of == "finite_number":
        return InvalidMessage("bad_value", f"{where} must be finite")
    if kind_of in _BOUND_ERRORS:
        return InvalidMessage("bad_timestamp" if name == "timestamp" else "bad_value",
                              _BOUND_TEXT[name].format(v=float(value)))
    if kind_of in CODES:  # raised by the checks above
        return InvalidMessage(kind_of, e["ctx"]["reason"].replace("{where}", where))
    return InvalidMessage("bad_value", f"{where}: {e['msg']}")  # pragma: no cover - a type pydantic added


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["InvalidMessage", "Limits", "parse_event", "parse_catalog", "parse_request", "to_wire", "wire_model",
           "CODES", "EVENT_TYPES", "CATALOG_TYPES", "REQUEST_TYPES"]
