"""The xgrammar backend (the default): JSON schemas, regexes, EBNF grammars and choices, compiled into
xgrammar's token-mask tables.

Two things make its bitmasks cheap:

* xgrammar's vocabulary ends at the tokenizer's last id, not at the model's (often padded) vocabulary:
  a mask costs with every id xgrammar knows, padding ids too. A row inside a free JSON string took
  some 100 us at 128,256 ids over SmolLM2's 49,152 tokens, 5-8 us at 49,152; the model's ids past the
  tokenizer are never allowed either way (their words of the bitmask are zeroed here).
* a step's rows are filled by kiln's own threads, started once: xgrammar's multi-threaded
  ``BatchGrammarMatcher`` starts and joins a new pool of half the machine's hardware threads on every
  call, a single row included. Each thread runs a single-threaded ``BatchGrammarMatcher`` (one C++
  loop, the GIL released) over its share of the rows; the engine's thread takes the first share.
  Rows are shared only when each share is worth a hand-off (``fill_shares``): a share is handed to a
  thread that must wake up and take the GIL twice, and on a 16-core host four shares of a 64-row step
  of SmolLM2's vocabulary (some 0.4 ms of filling in all) cost more than they saved. What a row costs
  is measured on fills the engine's thread does alone (the median of the last few): a share's time
  beside other threads would feed the hand-offs' own cost back into the estimate, and the backend's
  first fill runs cold (some 100 us for one row where the next take 6-15 us), so neither counts.
  While rows are shared, every ``PROBE_EVERY``-th fill is done alone to measure the rows again.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import xgrammar as xgr

from kiln import envs
from kiln.structured.backend import backend_message
from kiln.structured.spec import GrammarSpec
from kiln.structured.token_mask import bitmask_words

# rows a thread takes at least: a row costs 1-100 us, handing a share to a thread and waiting for it
# 44 us (submit and result of a no-op on the busy 2-core CPU machine)
ROWS_PER_THREAD = 16
# filling a share takes at least this long (estimated): four shares of a 0.3-0.5 ms fill made a step of
# the 16-core H200 host ~0.7 ms slower than one thread, so a hand-off costs up to ~0.2 ms there
MIN_SHARE_US = 1000.0
RECENT_FILLS = 8  # the estimate of a row's cost: the median over this many fills done alone
PROBE_EVERY = 16  # while rows are shared, one fill in this many is done alone (measured)


def fill_shares(num_rows: int, threads: int, us_per_row: float) -> int:
    """How many threads fill ``num_rows`` rows (the engine's own included): at most ``threads``, each
    share at least ``ROWS_PER_THREAD`` rows and ``MIN_SHARE_US`` of estimated work."""
    by_cost = int(num_rows * us_per_row // MIN_SHARE_US)
    return max(1, min(threads, num_rows // ROWS_PER_THREAD, by_cost))


def grammar_threads() -> int:
    configured = envs.grammar_threads()
    if configured is not None:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // 2))


def grammar_vocab_size(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> int:
    """The ids xgrammar needs: the model's, up to the tokenizer's last id (and the stop tokens)."""
    tokenizer_ids = max(tokenizer.get_vocab().values()) + 1
    return min(vocab_size, max(tokenizer_ids, max(stop_token_ids, default=-1) + 1))


def _ebnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    escaped = "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 else c for c in escaped)
    return f'"{escaped}"'


class XGrammarMatcher:
    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.handle = self.matcher._handle  # xgrammar's C++ matcher: its Python wrappers cost per row

    def accept(self, token: int) -> bool:
        return self.handle.accept_token(token, False)

    def is_terminated(self) -> bool:
        return self.handle.is_terminated()


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.vocab_size = grammar_vocab_size(tokenizer, vocab_size, stop_token_ids)
        self.words = bitmask_words(self.vocab_size)  # the tokens past them: never allowed
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=stop_token_ids or None
        )
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)  # kiln caches compiled grammars
        self.threads = grammar_threads()
        # xgrammar's C++ fillers, one a thread (their Python wrappers cost per row)
        self.fillers = [xgr.BatchGrammarMatcher(max_threads=1)._handle for _ in range(self.threads)]
        self.pool: ThreadPoolExecutor | None = None  # started on the first batch that shares its rows
        self.us_per_row = 0.0  # estimate of a row's fill (wall us, one thread); 0: none measured yet
        self.costs: deque[float] = deque(maxlen=RECENT_FILLS)  # us per row of the latest fills done alone
        self.fills = self.shared_fills = 0  # fills so far, and those whose rows were shared
        self._shared_since_probe = 0

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
        handles = [m.handle for m in matchers]
        narrow = bitmask if bitmask.shape[1] == self.words else None
        if narrow is None:  # xgrammar writes whole contiguous rows of its own width: fill, then place
            narrow = torch.empty(len(rows), self.words, dtype=torch.int32)
        self._fill(handles, narrow, rows if narrow is bitmask else list(range(len(rows))))
        tail = self.vocab_size % 32
        if tail:  # ids of the last word past the grammar's vocabulary (xgrammar may set them)
            last = narrow[:, -1]
            if narrow is bitmask and len(rows) < len(bitmask):  # some rows only: theirs
                index = torch.tensor(rows)
                last.index_copy_(0, index, last.index_select(0, index) & ((1 << tail) - 1))
            else:
                last &= (1 << tail) - 1
        if narrow is bitmask:
            return
        lo = rows[0]
        if rows == list(range(lo, lo + len(rows))):
            bitmask[lo : lo + len(rows), : self.words].copy_(narrow)  # (not __setitem__: an index_put)
            bitmask[lo : lo + len(rows), self.words :].zero_()
        else:
            index = torch.tensor(rows)
            bitmask[:, : self.words].index_copy_(0, index, narrow)
            bitmask[:, self.words :].index_fill_(0, index, 0)

    def _fill(self, handles: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        self.fills += 1
        shares = fill_shares(len(handles), self.threads, self.us_per_row)
        if shares > 1:
            self._shared_since_probe += 1
            if self._shared_since_probe >= PROBE_EVERY:  # this one alone: what do the rows cost now?
                shares, self._shared_since_probe = 1, 0
        if shares == 1:
            start = time.perf_counter()
            self.fillers[0].batch_fill_next_token_bitmask(handles, bitmask, rows, False)
            if self.fills > 1:  # the first fill runs cold
                self.costs.append(1e6 * (time.perf_counter() - start) / max(len(handles), 1))
                self.us_per_row = sorted(self.costs)[(len(self.costs) - 1) // 2]  # lower median
            return
        self.shared_fills += 1
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="kiln-grammar")
        # rows dealt round-robin: neighbouring rows (one request's samples) tend to cost alike
        fill = [f.batch_fill_next_token_bitmask for f in self.fillers]
        futures = [
            self.pool.submit(fill[k], handles[k::shares], bitmask, rows[k::shares], False)
            for k in range(1, shares)
        ]
        self.fillers[0].batch_fill_next_token_bitmask(handles[::shares], bitmask, rows[::shares], False)
        for future in futures:
            future.result()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
