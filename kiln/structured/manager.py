"""``StructuredOutputManager``: the engine's one entry point to structured outputs.

* ``validate(params)`` (before a request is added): normalises ``params.structured_outputs``, parses the
  constraint on the caller's thread (bad input raises ``ValueError`` with the backend's message) and
  starts compiling it on the thread pool, unless the cache has it.
* ``new_state(params)``: a ``GrammarState`` per sequence, sharing the request's compiled grammar.
* ``token_mask(seqs)``: the step's bitmask for the constrained rows, filled on the host from each
  matcher (which has seen every token before the one being sampled); the worker sends it to the device
  with a non-blocking copy.

Backends are created on first use (a tokenizer's vocabulary table takes a moment to build), so an engine
that never sees a constrained request never imports a grammar library.
"""

from __future__ import annotations

import concurrent.futures

import torch

from kiln.structured.backend import GrammarBackend, backend_name_for, make_backend
from kiln.structured.grammar_cache import GrammarCache
from kiln.structured.grammar_state import GrammarState
from kiln.structured.params import StructuredOutputsConfig, StructuredOutputsParams
from kiln.structured.spec import GrammarSpec
from kiln.structured.token_mask import GrammarBitmask, ban_unless_nothing_left


class StructuredOutputManager:
    def __init__(
        self,
        config: StructuredOutputsConfig,
        tokenizer,
        vocab_size: int,
        stop_token_ids: list[int],
        device: torch.device,
    ):
        self.config, self.tokenizer, self.vocab_size = config, tokenizer, vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.device = device
        self.pin = device.type == "cuda"  # the step's bitmask: pinned, copied without blocking
        self.backends: dict[str, GrammarBackend] = {}
        self.cache = GrammarCache()

    def backend(self, name: str) -> GrammarBackend:
        if name not in self.backends:
            self.backends[name] = make_backend(name, self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self.backends[name]

    def _compiled(self, params) -> tuple[GrammarBackend, concurrent.futures.Future]:
        if self.tokenizer is None:
            raise ValueError("structured_outputs need a tokenizer (skip_tokenizer_init=True)")
        so = params.structured_outputs = StructuredOutputsParams.from_value(params.structured_outputs)
        if so.kind == "structural_tag":
            raise NotImplementedError("kiln does not implement structured_outputs.structural_tag")
        spec = GrammarSpec.from_params(so, self.config)
        backend = self.backend(backend_name_for(spec, self.config.backend))
        key = (backend.name, spec)
        future = self.cache.get(key)
        if future is None:
            parsed = backend.parse(spec)  # ValueError on a bad schema / regex / grammar
            future = self.cache.submit(key, backend.compile, parsed)
        return backend, future

    def validate(self, params) -> None:
        self._compiled(params)

    def new_state(self, params) -> GrammarState:
        return GrammarState(*self._compiled(params))

    @staticmethod
    def wait_for_any(seqs, timeout: float = 0.05) -> bool:
        """Wait (at most ``timeout`` s) for one of ``seqs``' grammars to compile; False when none is
        still compiling."""
        pending = {s.grammar.future for s in seqs if s.grammar is not None and not s.grammar.future.done()}
        if not pending:
            return False
        concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return True

    def token_mask(self, seqs) -> GrammarBitmask | None:
        """Bitmask of the sampling rows whose sequence (None: finished meanwhile) has an active
        grammar; None when there is none. Every token before the sampled one has been read back."""
        rows, states = [], []
        for i, s in enumerate(seqs):
            state = None if s is None else s.grammar
            if state is not None and state.active:
                rows.append(i)
                states.append(state)
        if not rows:
            return None
        backend = states[0].backend
        if all(state.backend is backend for state in states):  # one backend: every row, in order
            words = backend.words
            bitmask = torch.empty(len(rows), words, dtype=torch.int32, pin_memory=self.pin)
            backend.fill_bitmask([state.matcher for state in states], bitmask, list(range(len(rows))))
        else:
            by_backend: dict[str, tuple[GrammarBackend, list, list[int]]] = {}
            for j, state in enumerate(states):
                entry = by_backend.setdefault(state.backend.name, (state.backend, [], []))
                entry[1].append(state.matcher)
                entry[2].append(j)
            words = max(backend.words for backend, _, _ in by_backend.values())
            bitmask = torch.empty(len(rows), words, dtype=torch.int32, pin_memory=self.pin)
            for backend, matchers, indices in by_backend.values():
                backend.fill_bitmask(matchers, bitmask, indices)
        for j, i in enumerate(rows):  # min_tokens: no stop token yet, unless the grammar allows only those
            p = seqs[i].params
            if p.min_tokens and len(seqs[i].output_token_ids) < p.min_tokens and p.all_stop_token_ids:
                ban_unless_nothing_left(bitmask[j], p.all_stop_token_ids, self.vocab_size)
        return GrammarBitmask(rows, bitmask, len(seqs))

    def shutdown(self) -> None:
        self.cache.shutdown()
        for backend in self.backends.values():
            backend.shutdown()
