"""The grammar bitmask: unpacking and applying it on the logits, against xgrammar's own kernel."""

import pytest
import torch

from kiln.structured.token_mask import (
    TokenMask,
    apply_token_bitmask,
    ban_unless_nothing_left,
    bitmask_words,
    unpack_bitmask,
)

xgr = pytest.importorskip("xgrammar")


def _random_bitmask(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(rows, vocab, generator=g) < 0.3
    padded = torch.zeros(rows, bitmask_words(vocab) * 32, dtype=torch.bool)
    padded[:, :vocab] = allowed
    weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
    words = (padded.view(rows, -1, 32).long() * weights).sum(-1)
    return allowed, words.to(torch.int64).sub(torch.where(words >= 2**31, 2**32, 0)).to(torch.int32)


@pytest.mark.parametrize("vocab", [32, 1000, 49152 + 7])
def test_unpack_matches_the_bits(vocab):
    allowed, bitmask = _random_bitmask(3, vocab)
    assert torch.equal(unpack_bitmask(bitmask, vocab), allowed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_xgrammar(dtype):
    vocab = 1003
    _, bitmask = _random_bitmask(4, vocab, seed=1)
    logits = torch.randn(4, vocab).to(dtype)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab)
    assert torch.equal(apply_token_bitmask(logits, bitmask, None), expected)
    assert torch.equal(TokenMask(bitmask, None).apply(logits), expected)


def test_apply_to_some_rows_leaves_the_others_untouched():
    vocab = 300
    _, bitmask = _random_bitmask(2, vocab, seed=2)
    logits = torch.randn(5, vocab)
    out = apply_token_bitmask(logits, bitmask, torch.tensor([1, 3]))
    for row in (0, 2, 4):
        assert torch.equal(out[row], logits[row])
    expected = logits[[1, 3]].clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab)
    assert torch.equal(out[[1, 3]], expected)


def test_ban_unless_nothing_left():
    vocab = 70
    row = torch.zeros(bitmask_words(vocab), dtype=torch.int32)
    row[0] = (1 << 2) | -(1 << 31)  # tokens 2 and 31 allowed (bit 31 is the sign bit)
    ban_unless_nothing_left(row, [31], vocab)
    assert unpack_bitmask(row[None], vocab)[0].nonzero().flatten().tolist() == [2]
    ban_unless_nothing_left(row, [2], vocab)  # the only token left stays
    assert unpack_bitmask(row[None], vocab)[0].nonzero().flatten().tolist() == [2]


@pytest.mark.parametrize("rows", [None, [1, 3]])
def test_a_narrow_bitmask_bans_the_tokens_past_it(rows):
    """A bitmask of the grammar's width over a padded vocabulary: as the same bitmask padded with zero
    words (xgrammar's kernel on that as the reference)."""
    vocab, narrow_vocab = 1000, 700
    _, narrow = _random_bitmask(2 if rows else 5, narrow_vocab, seed=3)
    padded = torch.zeros(len(narrow), bitmask_words(vocab), dtype=torch.int32)
    padded[:, : narrow.shape[1]] = narrow
    logits = torch.randn(5, vocab)
    index = None if rows is None else torch.tensor(rows)
    out = apply_token_bitmask(logits, narrow, index)
    assert torch.equal(out, apply_token_bitmask(logits, padded, index))
    expected = logits.clone() if rows is None else logits[rows].clone()
    xgr.apply_token_bitmask_inplace(expected, padded, vocab_size=vocab)
    assert torch.equal(out if rows is None else out[rows], expected)
    assert torch.isinf(out if rows is None else out[rows])[:, bitmask_words(narrow_vocab) * 32 :].all()


def test_ban_unless_nothing_left_on_a_narrow_row():
    vocab = 200
    row = torch.zeros(2, dtype=torch.int32)  # tokens 64 and up: never allowed
    row[1] = (1 << 3) | (1 << 4)  # tokens 35 and 36
    ban_unless_nothing_left(row, [36, 150], vocab)  # 150 lies past the row: banned already
    assert unpack_bitmask(row[None], vocab)[0].nonzero().flatten().tolist() == [35]
