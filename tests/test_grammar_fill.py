"""xgrammar bitmask filling: kiln's fill (xgrammar's vocabulary cut at the tokenizer's last id, rows
shared over kiln's threads) equals xgrammar's own per-row fill over the model's whole vocabulary bit
for bit (the bits past the vocabulary in the last word cleared), into a bitmask of the model's width
or of the grammar's own (the words past it: never allowed); rows not asked for are left alone; the
thread count setting and the rule that shares rows over threads are checked."""

import json

import pytest
import torch

from kiln.structured.token_mask import bitmask_words

xgr = pytest.importorskip("xgrammar")
transformers = pytest.importorskip("transformers")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "count": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "count", "tags"],
}
# prefixes that leave the matchers in different states: free string, number, array, between keys
PREFIXES = ['{"name": "ab', '{"name": "abc", "count": 1', '{"name": "x", "count": 3, "tags": ["', "", '{"na']
UNTOUCHED = 12345


@pytest.fixture(scope="module", params=[0, 1], ids=["whole-words", "partial-last-word"])
def tokenizer(request, tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([f"<extra_{i}>" for i in range(request.param)])  # 49,153 ids: a partial last word
    return tok


def _advanced(matchers):
    for i, m in enumerate(matchers):
        assert m.accept_string(PREFIXES[i % len(PREFIXES)])
    return matchers


@pytest.mark.parametrize("width", ["model", "grammar"])
@pytest.mark.parametrize("model_extra", [0, 100, 128256 - 49152])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_fill_equals_xgrammar_over_the_model_vocabulary(tokenizer, model_extra, threads, width, monkeypatch):
    from kiln.structured.xgrammar_backend import MIN_SHARE_US, XGrammarBackend

    monkeypatch.setenv("KILN_GRAMMAR_THREADS", str(threads))
    vocab = len(tokenizer) + model_extra
    stop = [tokenizer.eos_token_id]
    backend = XGrammarBackend(tokenizer, vocab, stop)
    assert backend.vocab_size == len(tokenizer)
    grammar = xgr.Grammar.from_json_schema(json.dumps(SCHEMA))
    n = 53  # 3 shares of at least 16 rows with 3 or more threads
    matchers = [backend.matcher(backend.compile(grammar)) for _ in range(n)]
    _advanced([m.matcher for m in matchers])
    # the reference: xgrammar knowing every id of the model, one row at a time
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=stop)
    full = xgr.GrammarCompiler(info, cache_enabled=False).compile_grammar(grammar)
    references = _advanced([xgr.GrammarMatcher(full) for _ in range(n)])
    words = bitmask_words(vocab)
    for rows in ([2 * i + 1 for i in range(n)][::-1], list(range(3, 3 + n))):  # scattered, contiguous
        expected = torch.full((2 * n + 3, words), UNTOUCHED, dtype=torch.int32)
        for m, row in zip(references, rows):
            m.fill_next_token_bitmask(expected, row)
        if vocab % 32:  # xgrammar may set the bits past the vocabulary; no logit reads them
            expected[rows, -1] &= (1 << vocab % 32) - 1
        got = torch.full(
            (len(expected), words if width == "model" else backend.words), UNTOUCHED, dtype=torch.int32
        )
        backend.us_per_row = MIN_SHARE_US  # rows this dear are shared over every thread allowed
        backend.fill_bitmask(matchers, got, rows)
        if width == "grammar":  # the words past the grammar's: none allowed in the reference
            assert (expected[rows, got.shape[1] :] == 0).all()
            expected = expected[:, : got.shape[1]]
        if got.shape[1] == words and vocab % 32:
            got[rows, -1] &= (1 << vocab % 32) - 1
        assert torch.equal(got, expected)
        others = sorted(set(range(len(got))) - set(rows))
        assert (got[others] == UNTOUCHED).all()
    firsts = {tuple(got[r].tolist()) for r in rows[: len(PREFIXES)]}
    assert len(firsts) == len(PREFIXES)  # the matchers' states differ
    assert (backend.pool is not None) == (threads > 1)
    assert backend.fills == 2 and backend.shared_fills == (2 if threads > 1 else 0)
    if threads == 1:  # the second fill measured (the first runs cold), alone
        assert 0 < backend.us_per_row < MIN_SHARE_US and len(backend.costs) == 1
    else:  # shared fills are not measured
        assert backend.us_per_row == MIN_SHARE_US and not backend.costs
    backend.shutdown()


def test_row_cost_is_measured_on_fills_done_alone(tokenizer, monkeypatch):
    """The estimate that decides the shares: the first (cold) fill and the shared fills do not count;
    while rows are shared every PROBE_EVERY-th fill is done alone, so a cost that fell is seen."""
    import time

    from kiln.structured.xgrammar_backend import PROBE_EVERY, XGrammarBackend

    monkeypatch.setenv("KILN_GRAMMAR_THREADS", "4")
    backend = XGrammarBackend(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    us_per_row, calls = [5000.0], []

    class Filler:  # what a row costs is us_per_row[0]; records which thread filled how many rows
        def __init__(self, k):
            self.k = k

        def batch_fill_next_token_bitmask(self, handles, bitmask, rows, debug):
            calls.append((self.k, len(rows)))
            time.sleep(1e-6 * us_per_row[0] * len(rows))

    backend.fillers = [Filler(k) for k in range(4)]
    bitmask = torch.zeros(64, backend.words, dtype=torch.int32)
    rows = list(range(64))
    backend._fill([None], bitmask, [0])  # cold: 5 ms for one row
    assert backend.us_per_row == 0.0 and calls == [(0, 1)]
    us_per_row[0] = 200.0  # 12.8 ms for 64 rows: worth 4 shares, once measured
    backend._fill([None] * 64, bitmask, rows)
    assert calls[-1] == (0, 64) and backend.us_per_row >= 200.0
    calls.clear()
    us_per_row[0] = 1.0  # the rows got cheap: shared fills do not show it, the probe does
    for _ in range(PROBE_EVERY - 1):
        backend._fill([None] * 64, bitmask, rows)
    assert sorted(calls) == sorted([(k, 16) for k in range(4)] * (PROBE_EVERY - 1))
    assert backend.us_per_row >= 200.0 and backend.shared_fills == PROBE_EVERY - 1
    calls.clear()
    backend._fill([None] * 64, bitmask, rows)  # the probe: alone, measured
    assert calls == [(0, 64)] and backend.us_per_row < 200.0
    backend._fill([None] * 64, bitmask, rows)
    assert calls[-1] == (0, 64)  # cheap rows stay on the engine's thread
    assert backend.fills == PROBE_EVERY + 3 and backend.shared_fills == PROBE_EVERY - 1
    backend.shutdown()


def test_rows_are_shared_only_when_each_share_is_worth_a_hand_off():
    from kiln.structured.xgrammar_backend import MIN_SHARE_US, ROWS_PER_THREAD, fill_shares

    assert fill_shares(64, 8, 0.0) == 1  # nothing measured yet
    assert fill_shares(64, 8, 6.0) == 1  # SmolLM2's vocabulary inside a JSON string: 0.4 ms in all
    assert fill_shares(64, 8, 55.0) == 3  # a vocabulary of Llama 3's size: 3.5 ms, 1.2 ms a share
    assert fill_shares(64, 1, 55.0) == 1  # one thread allowed
    assert fill_shares(64, 8, 1e4) == 64 // ROWS_PER_THREAD  # dear rows: at least 16 a thread
    assert fill_shares(8 * ROWS_PER_THREAD, 8, 1e4) == 8
    assert fill_shares(ROWS_PER_THREAD - 1, 8, 1e4) == 1
    assert fill_shares(0, 8, 1e4) == 1
    rows = 64  # every share of the rule carries MIN_SHARE_US of work at least
    for us in (1.0, 10.0, 20.0, 40.0, 100.0, 400.0):
        shares = fill_shares(rows, 8, us)
        assert shares == 1 or rows * us / shares >= MIN_SHARE_US


def test_grammar_threads_setting(monkeypatch):
    from kiln import envs
    from kiln.structured.xgrammar_backend import grammar_threads

    monkeypatch.setenv("KILN_GRAMMAR_THREADS", "3")
    assert grammar_threads() == 3
    monkeypatch.delenv("KILN_GRAMMAR_THREADS")
    assert 1 <= grammar_threads() <= 8
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("KILN_GRAMMAR_THREADS", bad)
        with pytest.raises(ValueError, match="KILN_GRAMMAR_THREADS"):
            envs.grammar_threads()
