"""``GrammarSpec``: a request's constraint in normal form, hashable, so it keys the compiled-grammar cache."""

from __future__ import annotations

import json
from dataclasses import dataclass

from kiln.structured.params import StructuredOutputsConfig, StructuredOutputsParams


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # "json" | "regex" | "choice" | "grammar" | "structural_tag" (json_object is a json schema)
    text: str  # the schema as canonical JSON, the regex, the grammar, or the choices as a JSON list
    any_whitespace: bool = True
    additional_properties: bool = True  # False: objects take only the keys their schema lists
    whitespace_pattern: str | None = None

    @classmethod
    def from_params(cls, params: StructuredOutputsParams, config: StructuredOutputsConfig) -> GrammarSpec:
        kind = params.kind
        if kind == "json":
            schema = json.loads(params.json) if isinstance(params.json, str) else params.json
            text = json.dumps(schema, separators=(",", ":"))  # key order is property order
        elif kind == "json_object":
            kind, text = "json", '{"type":"object"}'
        elif kind == "choice":
            text = json.dumps(params.choice)
        else:
            text = getattr(params, kind)
        return cls(
            kind=kind,
            text=text,
            any_whitespace=not (params.disable_any_whitespace or config.disable_any_whitespace),
            additional_properties=not (
                params.disable_additional_properties or config.disable_additional_properties
            ),
            whitespace_pattern=params.whitespace_pattern,
        )

    def schema(self) -> dict | bool:
        """The JSON schema (kind "json"), with ``additionalProperties: false`` added to every object
        schema that does not say otherwise when ``additional_properties`` is off."""
        schema = json.loads(self.text)
        return schema if self.additional_properties else _close_objects(schema)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _close_objects(node):
    """Copy of a schema node with ``additionalProperties: false`` on each object schema lacking the key."""
    if isinstance(node, list):
        return [_close_objects(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema, not a schema itself
            out[key] = {name: _close_objects(sub) for name, sub in value.items()}
        elif key in ("enum", "const", "examples", "default", "required"):
            out[key] = value
        else:
            out[key] = _close_objects(value)
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
