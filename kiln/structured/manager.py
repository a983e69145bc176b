"""``StructuredOutputManager``: the engine's one entry point to structured outputs.

* ``validate(params)`` (before a request is added): normalises ``params.structured_outputs``, parses the
  constraint on the caller's thread (bad input raises ``ValueError`` with the backend's message) and
  starts compiling it on the thread pool, unless the cache has it.
* ``new_state(params)``: a ``GrammarState`` per sequence, sharing the request's compiled grammar.
* ``begin_token_mask(seqs, overlap)`` / ``finish_token_mask``: the step's bitmask for the constrained
  rows, filled on the host from each matcher (which has seen every token before the one being
  sampled); with ``overlap`` on a helper thread (``FillThread``) while the engine processes the
  read-back step's outputs; the worker sends it to the device with a non-blocking copy.
  ``token_mask(seqs)`` does both at once.

Backends are created on first use (a tokenizer's vocabulary table takes a moment to build), so an engine
that never sees a constrained request never imports a grammar library.
"""

from __future__ import annotations

import concurrent.futures
import weakref
from dataclasses import dataclass

import torch

from kiln.structured.backend import GrammarBackend, backend_name_for, make_backend
from kiln.structured.fill_thread import FillThread
from kiln.structured.grammar_cache import GrammarCache
from kiln.structured.grammar_state import GrammarState
from kiln.structured.params import StructuredOutputsConfig, StructuredOutputsParams
from kiln.structured.spec import GrammarSpec
from kiln.structured.token_mask import GrammarBitmask, ban_unless_nothing_left


@dataclass
class PendingMask:
    """A step's bitmask between ``begin_token_mask`` and ``finish_token_mask``."""

    rows: list[int]  # sampling rows with an active grammar, in order
    bitmask: torch.Tensor | None  # int32 [len(rows), words] on the host, being filled
    num_rows: int  # sampling rows of the step
    filling: bool = False  # the helper thread is filling it


class StructuredOutputManager:
    # a fill is overlapped from this estimated length: below it the two hand-overs to the helper
    # (~40 us on a busy 2-core machine, benchmarks/grammar_fill.py) cost more than they hide
    overlap_min_us = 50.0

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
        self._filler: FillThread | None = None  # the overlapped fills' helper, started on first use
        self._filler_finalizer = None

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

    def begin_token_mask(self, seqs, overlap: bool = False) -> PendingMask | None:
        """Start filling the bitmask of the sampling rows whose sequence (None: finished meanwhile) has
        an active grammar; None when there is none. Every token before the sampled one has reached the
        matchers. ``overlap``: fill on the helper thread (when the rows' backend releases the GIL and its
        estimate of the fill reaches ``overlap_min_us``), so the caller's work until
        ``finish_token_mask`` runs beside it."""
        rows, states = [], []
        for i, s in enumerate(seqs):
            state = None if s is None else s.grammar
            if state is not None and state.active:
                rows.append(i)
                states.append(state)
        if not rows:
            return None
        backend = states[0].backend
        pending = PendingMask(rows, None, len(seqs))
        if all(state.backend is backend for state in states):  # one backend: every row, in order
            bitmask = torch.empty(len(rows), backend.words, dtype=torch.int32, pin_memory=self.pin)
            args = ([state.matcher for state in states], bitmask, list(range(len(rows))))
            if overlap and backend.releases_gil and len(rows) * backend.us_per_row >= self.overlap_min_us:
                self._fill_thread().start(backend.fill_bitmask, *args)
                pending.filling = True
            else:
                backend.fill_bitmask(*args)
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
        pending.bitmask = bitmask
        return pending

    def finish_token_mask(self, pending: PendingMask | None, seqs) -> GrammarBitmask | None:
        """The bitmask ``begin_token_mask`` started (waits for its fill), with each row's min_tokens
        applied from ``seqs`` as they are now (a row whose sequence finished meanwhile is left as is:
        its token is dropped)."""
        if pending is None:
            return None
        if pending.filling:
            pending.filling = False
            self._filler.result()
        bitmask = pending.bitmask
        # min_tokens: no stop token yet, unless the grammar allows only those
        for j, i in enumerate(pending.rows):
            s = seqs[i]
            if s is None:
                continue
            p = s.params
            if p.min_tokens and len(s.output_token_ids) < p.min_tokens and p.all_stop_token_ids:
                ban_unless_nothing_left(bitmask[j], p.all_stop_token_ids, self.vocab_size)
        return GrammarBitmask(pending.rows, bitmask, pending.num_rows)

    def abandon_token_mask(self, pending: PendingMask | None) -> None:
        """Wait for a started fill whose step failed before ``finish_token_mask``."""
        if pending is not None and pending.filling:
            pending.filling = False
            self._filler.result()

    def token_mask(self, seqs) -> GrammarBitmask | None:
        """``begin_token_mask`` and ``finish_token_mask`` on the caller's thread."""
        return self.finish_token_mask(self.begin_token_mask(seqs), seqs)

    def _fill_thread(self) -> FillThread:
        if self._filler is None:
            self._filler = FillThread()
            # an engine dropped without shutdown() ends its helper too (the thread holds no reference here)
            self._filler_finalizer = weakref.finalize(self, self._filler.shutdown)
        return self._filler

    def shutdown(self) -> None:
        if self._filler is not None:
            self._filler_finalizer()  # runs the helper's shutdown once
            self._filler = None
        self.cache.shutdown()
        for backend in self.backends.values():
            backend.shutdown()
