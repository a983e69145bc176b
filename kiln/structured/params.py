"""``StructuredOutputsParams`` (one request's output constraint) and ``StructuredOutputsConfig`` (the
engine's choice of grammar backend), with vLLM's fields, defaults and errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

CONSTRAINT_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
BACKENDS = ("auto", "xgrammar", "guidance")


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output: exactly one of ``json`` (a JSON schema, as a dict or a string),
    ``regex``, ``choice`` (the output is one of these strings), ``grammar`` (EBNF/GBNF for xgrammar;
    Lark or GBNF for guidance), ``json_object=True`` (any JSON object) or ``structural_tag``.

    ``disable_any_whitespace`` allows no whitespace between JSON tokens; ``disable_additional_properties``
    forbids object keys the schema does not list; ``whitespace_pattern`` (guidance only) is the regex
    of the whitespace allowed between JSON tokens. ``disable_fallback`` is accepted for compatibility:
    kiln never switches backend silently on a request that names one.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                "You can only use one kind of structured outputs constraint but multiple are specified: "
                f"{given}"
            )
        if not given:
            raise ValueError(
                "You must use one kind of structured outputs constraint but none are specified: "
                f"set one of {list(CONSTRAINT_FIELDS)}"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    parsed = json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            else:
                parsed = self.json
            if not isinstance(parsed, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {self.json!r}")
        for name in ("regex", "grammar", "whitespace_pattern", "structural_tag"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {value!r}")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("structured_outputs.grammar is empty")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice:
                raise ValueError(
                    f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}"
                )
            self.choice = list(self.choice)
            bad = [c for c in self.choice if not isinstance(c, str)]
            if bad:
                raise ValueError(f"structured_outputs.choice must hold strings, got {bad[0]!r}")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object must be True or None, got {self.json_object!r}")

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputsParams:
        """A ``StructuredOutputsParams`` or a dict of its fields (unknown keys raise ValueError)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"structured_outputs: unknown field(s) {unknown}; known: {sorted(known)}")
            return cls(**value)
        raise ValueError(
            f"structured_outputs must be a StructuredOutputsParams or a dict, got {type(value).__name__}"
        )

    @property
    def kind(self) -> str:
        """The constraint field that is set."""
        return next(name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None)


@dataclass
class StructuredOutputsConfig:
    """``LLM(structured_outputs_config=...)``: ``backend`` is ``"auto"`` (xgrammar; guidance for what
    only guidance supports, such as ``whitespace_pattern``), ``"xgrammar"`` or ``"guidance"``.
    ``disable_any_whitespace`` and ``disable_additional_properties`` set the default of every request."""

    backend: str = "auto"
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"structured_outputs_config backend must be one of {list(BACKENDS)}, got {self.backend!r}"
            )
        if self.reasoning_parser:
            raise NotImplementedError(
                f"structured_outputs_config reasoning_parser={self.reasoning_parser!r}: kiln has no "
                "reasoning parsers"
            )

    @classmethod
    def parse(cls, value: Any) -> StructuredOutputsConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"structured_outputs_config: unknown key(s) {unknown}; known: {sorted(known)}"
                )
            return cls(**value)
        raise ValueError(
            f"structured_outputs_config must be a dict or StructuredOutputsConfig, got {type(value).__name__}"
        )
