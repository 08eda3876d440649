"""JSON Schemas of the records, generated from their annotations."""

from __future__ import annotations

import typing
from typing import Any, Union

from schemas.validate import TYPE_OF, _fields

_SIMPLE = {str: {"type": "string"}, float: {"type": "number"}, int: {"type": "integer"},
           bool: {"type": "boolean"}}


def _schema_of(hint: Any) -> dict:
    if hint in _SIMPLE:
        return dict(_SIMPLE[hint])
    origin = typing.get_origin(hint)
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return {"anyOf": [_schema_of(args[0]), {"type": "null"}]}
    if origin is list:
        return {"type": "array", "items": _schema_of(typing.get_args(hint)[0])}
    if hasattr(hint, "_options"):
        return {"$ref": f"#/$defs/{hint._options.namespace}"}
    raise TypeError(f"no JSON Schema for {hint!r}")  # pragma: no cover


def json_schema(cls: type) -> dict:
    """The JSON Schema of one record class (as written on the wire by ``to_wire``)."""
    fields = _fields(cls)
    ns = cls._options.namespace
    props: dict[str, Any] = {}
    required = []
    if cls in TYPE_OF:
        props["type"] = {"const": TYPE_OF[cls]}
        required.append("type")
    props["schema"] = {"const": ns, "description": "optional on input"}
    for name, (hint, req) in fields.items():
        props[name] = _schema_of(hint)
        if req:
            required.append(name)
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": ns, "title": cls.__name__,
           "description": (cls.__doc__ or "").strip(), "type": "object", "properties": props,
           "required": required, "additionalProperties": False}
    refs = {h._options.namespace: json_schema(h) for h, _ in (
        (typing.get_args(h)[0] if typing.get_origin(h) is list else h, r) for h, r in fields.values())
        if hasattr(h, "_options")}
    if refs:
        out["$defs"] = refs
    return out


def all_schemas() -> dict[str, dict]:
    """Every record's schema, by namespace."""
    from schemas import RECORDS

    return {cls._options.namespace: json_schema(cls) for cls in RECORDS}
