"""Structured outputs: JSON schemas, regexes, choices and grammars enforced by token bitmasks
(xgrammar by default, llguidance as the ``"guidance"`` backend)."""

from kiln.structured.params import StructuredOutputsConfig, StructuredOutputsParams

__all__ = ["StructuredOutputsConfig", "StructuredOutputsParams"]
