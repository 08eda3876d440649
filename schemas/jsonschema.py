"""JSON Schemas of the records: pydantic's, from the strict wire models that validate input."""

from __future__ import annotations

from schemas.validate import wire_model


def json_schema(cls: type) -> dict:
    """The JSON Schema of one record class (as written on the wire by ``to_wire``)."""
    ns = cls._options.namespace
    generated = wire_model(cls).model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": ns, **generated}


def all_schemas() -> dict[str, dict]:
    """Every record's schema, by namespace."""
    from schemas import RECORDS

    return {cls._options.namespace: json_schema(cls) for cls in RECORDS}
