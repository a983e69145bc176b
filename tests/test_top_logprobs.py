"""``top_logprobs``: every row's top entries, its token's logprob and rank, computed for all rows at once
and read per row (the output processor) or as arrays (a beam search)."""

import pytest
import torch

from kiln.runtime.top_logprobs import TopLogprobs, top_logprobs


@pytest.mark.parametrize("as_tensor", [False, True])
def test_entries_per_row_and_arrays(as_tensor):
    logprobs = torch.randn(5, 12, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    tokens = [3, 0, 11, 7, 5]
    ks = [2, None, 5, -1, 0]
    out = top_logprobs(logprobs, torch.tensor(tokens) if as_tensor else tokens, ks)
    assert isinstance(out, TopLogprobs) and len(out) == 5
    for row, (token, k) in enumerate(zip(tokens, ks)):
        if k is None:
            assert out[row] is None
            continue
        width = 12 if k == -1 else k
        values, ids = logprobs[row].topk(width)
        value = logprobs[row, token].item()
        rank = int((logprobs[row] > value).sum()) + 1
        assert out[row] == (ids.tolist(), values.tolist(), value, rank)
    assert list(out) == [out[i] for i in range(5)] and out[-1] == out[4]
    out.wait()
    lines = [out.index[row] for row in range(5)]
    assert lines == [0, -1, 1, 2, 3]  # rows that asked, in order
    assert out.token_ids.tolist() == [3, 11, 7, 5] and out.ks == [2, 5, 12, 0]
    assert out.ids[1, :5].tolist() == out[2][0] and out.values[2].tolist() == out[3][1]


def test_no_row_asks():
    assert top_logprobs(torch.zeros(3, 4), [0, 1, 2], [None, None, None]) == [None, None, None]


@pytest.mark.gpu
def test_on_cuda_the_host_copy_matches_the_cpu():
    logprobs = torch.randn(7, 300, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    tokens = torch.randint(0, 300, (7,), generator=torch.Generator().manual_seed(2))
    ks = [8, None, 3, 8, 20, None, 1]
    want = list(top_logprobs(logprobs, tokens, ks))
    got = top_logprobs(logprobs.cuda(), tokens.cuda(), ks)
    assert list(got) == want
    assert got.token_ids.tolist() == [t for t, k in zip(tokens.tolist(), ks) if k]
