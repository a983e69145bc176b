"""The xgrammar backend (the default): JSON schemas, regexes, EBNF grammars and choices, compiled into
xgrammar's token-mask tables; bitmasks of a batch filled by its multi-threaded batch matcher."""

from __future__ import annotations

import json

import torch
import xgrammar as xgr

from kiln.structured.backend import backend_message
from kiln.structured.spec import GrammarSpec


def _ebnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    escaped = "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 else c for c in escaped)
    return f'"{escaped}"'


class XGrammarMatcher:
    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
        )
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)  # kiln caches compiled grammars
        self.batch = xgr.BatchGrammarMatcher()

    def parse(self, spec: GrammarSpec) -> xgr.Grammar:
        if spec.whitespace_pattern is not None:
            raise ValueError(
                "structured_outputs.whitespace_pattern is not supported by the xgrammar backend; "
                "use structured_outputs_config={'backend': 'guidance'} (or 'auto' with llguidance installed)"
            )
        try:
            if spec.kind == "json":
                # strict mode (as in vLLM): objects and arrays take nothing their schema does not
                # list, so disable_additional_properties changes nothing here
                return xgr.Grammar.from_json_schema(
                    json.dumps(spec.schema()), any_whitespace=spec.any_whitespace
                )
            if spec.kind == "regex":
                return xgr.Grammar.from_regex(spec.text)
            if spec.kind == "choice":
                choices = " | ".join(_ebnf_literal(c) for c in json.loads(spec.text))
                return xgr.Grammar.from_ebnf(f"root ::= {choices}")
            if spec.kind == "grammar":
                return xgr.Grammar.from_ebnf(spec.text)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{spec.kind} is invalid: {backend_message(e)}") from None
        raise NotImplementedError(f"structured_outputs.{spec.kind} is not implemented by kiln")

    def compile(self, parsed: xgr.Grammar) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(parsed)

    def matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(compiled)

    def fill_bitmask(self, matchers: list[XGrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        self.batch.batch_fill_next_token_bitmask([m.matcher for m in matchers], bitmask, rows)
