"""What a grammar backend provides, and how one is picked for a request.

A backend turns a ``GrammarSpec`` into a grammar in three stages: ``parse`` (fast, on the caller's thread,
so a bad schema, regex or grammar raises ``ValueError`` with the backend's message before anything runs),
``compile`` (the token-mask tables, slow for large schemas: it runs on the compile thread pool) and
``matcher`` (per sequence state). ``fill_bitmask`` writes the allowed next tokens of several matchers
into rows of one int32 bitmask (bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed), the
layout both xgrammar and llguidance use: ``words`` wide (the tokens past them are never allowed) or
wider (the words past its own zeroed). ``shutdown`` stops the threads it started.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Protocol

import torch

from kiln.structured.spec import GrammarSpec


class Matcher(Protocol):
    def accept(self, token: int) -> bool: ...
    def is_terminated(self) -> bool: ...


class GrammarBackend(Protocol):
    name: str
    words: int  # width of its bitmask rows: the tokens past them are never allowed

    def parse(self, spec: GrammarSpec) -> object: ...
    def compile(self, parsed: object) -> object: ...
    def matcher(self, compiled: object) -> Matcher: ...
    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor, rows: list[int]) -> None: ...
    def shutdown(self) -> None: ...


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def backend_message(error: Exception) -> str:
    """The backend's error text without its C++ log prefix (time, source file and line)."""
    return _LOG_PREFIX.sub("", str(error).strip())


def installed(name: str) -> bool:
    module = {"xgrammar": "xgrammar", "guidance": "llguidance"}[name]
    return importlib.util.find_spec(module) is not None


def backend_name_for(spec: GrammarSpec, configured: str) -> str:
    """The backend that runs ``spec``: the configured one, or for ``"auto"`` xgrammar unless the spec
    uses what only guidance supports (``whitespace_pattern``) and guidance is installed."""
    if configured != "auto":
        name = configured
    elif spec.whitespace_pattern is not None and installed("guidance"):
        name = "guidance"
    else:
        name = "xgrammar"
    if not installed(name):
        package = {"xgrammar": "xgrammar", "guidance": "llguidance"}[name]
        raise ValueError(
            f"structured outputs with the {name!r} backend need the {package!r} package: "
            f"pip install {package} (or pip install 'kiln[structured]')"
        )
    return name


def make_backend(name: str, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    if name == "xgrammar":
        from kiln.structured.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
    from kiln.structured.guidance_backend import GuidanceBackend

    return GuidanceBackend(tokenizer, vocab_size, stop_token_ids)
