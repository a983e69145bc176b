"""The guidance backend (llguidance): JSON schemas (with ``whitespace_pattern``), regexes, Lark or GBNF
grammars and choices. llguidance builds its token masks lazily, so ``compile`` has little to do."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from kiln.structured.spec import GrammarSpec
from kiln.structured.token_mask import bitmask_words


class GuidanceMatcher:
    """llguidance "stops" once nothing but the end can follow; its mask is then the EOS token alone.
    The grammar is terminated (as xgrammar's) only when that EOS has been accepted."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.eos = tokenizer.eos_token
        self.ended = False

    def accept(self, token: int) -> bool:
        if token == self.eos and (self.matcher.is_stopped() or self.matcher.is_accepting()):
            self.ended = True
            return True
        return self.matcher.consume_token(token)

    def is_terminated(self) -> bool:
        return self.ended


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        eos = stop_token_ids[0] if stop_token_ids else None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor()
        self.words = bitmask_words(vocab_size)

    def parse(self, spec: GrammarSpec) -> str:
        if spec.kind == "json":
            defaults = {"whitespace_flexible": spec.any_whitespace}
            if spec.whitespace_pattern is not None:
                defaults["whitespace_pattern"] = spec.whitespace_pattern
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(spec.schema()), defaults=defaults
            )
        elif spec.kind in ("regex", "choice", "grammar"):
            grammar = llguidance.grammar_from(spec.kind, spec.text)
        else:
            raise NotImplementedError(f"structured_outputs.{spec.kind} is not implemented by kiln")
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"structured_outputs.{spec.kind} is invalid: {error.strip()}")
        return grammar

    def compile(self, parsed: str) -> str:
        return parsed

    def matcher(self, compiled: str) -> GuidanceMatcher:
        return GuidanceMatcher(self.tokenizer, compiled)

    def fill_bitmask(self, matchers: list[GuidanceMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        pairs = [(m.matcher, row) for m, row in zip(matchers, rows)]
        llguidance.torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)

    def shutdown(self) -> None:  # llguidance's executor owns its threads
        pass
