"""Sampler statistics and semantics on synthetic logits (no model)."""

import pytest
import torch

from kiln.runtime.sampler import SamplingRow, sample, top_k_top_p_min_p
from kiln.runtime.sampling_params import SamplingParams

VOCAB = 50


def seqs_for(params: SamplingParams, rows: int, prompt=(1, 2, 3), seeded=False):
    out = []
    for _ in range(rows):
        gen = torch.Generator().manual_seed(params.seed) if seeded else None
        out.append(SamplingRow(params, gen, 0, list(prompt)))
    return out


def draws(params: SamplingParams, logits: torch.Tensor, n=4000):
    seqs = seqs_for(params, n)
    gen = torch.Generator().manual_seed(0)
    return torch.tensor(sample(logits.expand(n, -1).clone(), seqs, gen).token_ids)


LOGITS = torch.linspace(3.0, -3.0, VOCAB)[None]  # token 0 most likely; probabilities strictly decreasing


def test_top_k_never_emits_excluded_tokens():
    tokens = draws(SamplingParams(temperature=1.5, top_k=5), LOGITS)
    assert tokens.max() < 5
    assert len(tokens.unique()) == 5  # and all five allowed tokens do occur


def test_top_p_never_emits_excluded_tokens():
    probs = LOGITS.softmax(-1)[0]
    nucleus = int((probs.cumsum(0) < 0.6).sum()) + 1  # smallest prefix with mass >= 0.6
    tokens = draws(SamplingParams(temperature=1.0, top_p=0.6), LOGITS)
    assert tokens.max() < nucleus
    assert len(tokens.unique()) == nucleus


def test_min_p_never_emits_excluded_tokens():
    probs = LOGITS.softmax(-1)[0]
    allowed = int((probs >= 0.2 * probs.max()).sum())
    tokens = draws(SamplingParams(temperature=1.0, min_p=0.2), LOGITS)
    assert tokens.max() < allowed
    assert len(tokens.unique()) == allowed


def test_sampling_follows_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0] + [-30.0] * (VOCAB - 3)])
    tokens = draws(SamplingParams(temperature=1.0), logits, n=20000)
    freq = torch.bincount(tokens, minlength=VOCAB)[:3].float() / len(tokens)
    assert torch.allclose(freq, logits[0, :3].softmax(-1), atol=0.02)


def test_top_k_top_p_helper_keeps_at_least_one():
    masked = top_k_top_p_min_p(LOGITS.clone(), None, torch.tensor([1e-9]), None)
    assert torch.isfinite(masked).sum() == 1


def test_seed_reproducible_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    alone = sample(logits.clone(), seqs_for(params, 1, seeded=True), torch.Generator().manual_seed(0))
    others = seqs_for(SamplingParams(temperature=1.0), 5)
    batch = torch.cat([torch.randn(5, VOCAB), logits])
    mixed = sample(batch, others + seqs_for(params, 1, seeded=True), torch.Generator().manual_seed(99))
    assert mixed.token_ids[-1] == alone.token_ids[0]


MIXED = [  # one row each: every stage on in some row and off in others, on greedy and on random rows
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.5),
    SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.2),
    SamplingParams(temperature=0, logit_bias={5: 3.0}),
    SamplingParams(temperature=0, min_tokens=3, stop_token_ids=list(range(0, VOCAB, 2))),  # bans stop ids
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=5.0, top_k=1, seed=2),  # the filters leave one token: misplaced, a
    SamplingParams(temperature=5.0, top_p=0.01, seed=3),  # hot row would draw another
    SamplingParams(temperature=5.0, min_p=0.99, seed=4),
    SamplingParams(temperature=1.0, repetition_penalty=1.8, seed=5),
    SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5, seed=6),
    SamplingParams(temperature=1.0, logit_bias={7: 5.0}, seed=7),
    SamplingParams(temperature=1.0, allowed_token_ids=[3, 9, 11], seed=8),
    SamplingParams(temperature=0, logprobs=3),
    SamplingParams(temperature=2.0, seed=9, logprobs=2),
]


@pytest.mark.parametrize("logprobs_mode", ["raw_logprobs", "processed_logprobs"])
def test_each_row_of_a_mixed_batch_samples_as_it_would_alone(logprobs_mode):
    """Per-row settings reach their own row: a batch of seeded rows with different settings gives
    each row the token (and logprobs) it gets in a batch of its own."""
    logits = torch.randn(len(MIXED), VOCAB, generator=torch.Generator().manual_seed(3))

    def rows():  # each row its own tokens, so that a penalty applied to the wrong row shows
        return [
            SamplingRow(
                p, torch.Generator().manual_seed(p.seed) if p.seed else None, 2, [1, 2, 3, 2 * i], [4, i]
            )
            for i, p in enumerate(MIXED)
        ]

    batch = sample(logits.clone(), rows(), torch.Generator().manual_seed(0), logprobs_mode)
    for i, row in enumerate(rows()):
        alone = sample(logits[i : i + 1].clone(), [row], torch.Generator().manual_seed(1), logprobs_mode)
        assert batch.token_ids[i] == alone.token_ids[0], MIXED[i]
        assert batch.logprobs[i] == alone.logprobs[0], MIXED[i]
    assert batch.logprobs[-1] is not None and batch.logprobs[0] is None


def test_unseeded_rows_differ_across_draws():
    tokens = draws(SamplingParams(temperature=1.0), torch.zeros(1, VOCAB), n=200)
    assert len(tokens.unique()) > 20


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2], logits[0, 7] = 2.0, 1.5  # token 2 is in the prompt
    plain = sample(logits.clone(), seqs_for(SamplingParams(temperature=0), 1), None).token_ids
    penalised = sample(
        logits.clone(), seqs_for(SamplingParams(temperature=0, repetition_penalty=2.0), 1), None
    )
    assert plain == [2] and penalised.token_ids == [7]


def test_presence_and_frequency_penalties_use_output_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 4], logits[0, 5] = 1.0, 0.5
    seq = seqs_for(SamplingParams(temperature=0, frequency_penalty=0.3), 1)[0]
    seq.output_token_ids = [4, 4]
    assert sample(logits.clone(), [seq], None).token_ids == [5]
    seq = seqs_for(SamplingParams(temperature=0, presence_penalty=0.6), 1)[0]
    seq.output_token_ids = [4]
    assert sample(logits.clone(), [seq], None).token_ids == [5]


def test_min_tokens_bans_stop_ids():
    logits = torch.zeros(1, VOCAB)
    logits[0, 9] = 5.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9])
    assert sample(logits.clone(), seqs_for(params, 1), None).token_ids != [9]


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.5, top_k=3, logprobs=4, seed=0)
    out = sample(logits.clone(), seqs_for(params, 2, seeded=True), None)
    raw = logits.log_softmax(-1)
    for row, (token, (ids, _, lp, rank)) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(lp - raw[row, token].item()) < 1e-6
        assert ids == raw[row].topk(4).indices.tolist()
        assert rank == int((raw[row] > raw[row, token]).sum()) + 1


def _argmax_cases(device, dtype):
    g = torch.Generator().manual_seed(0)
    vocab = 5000  # not a multiple of the kernel's chunk
    x = torch.randn(6, vocab, generator=g)
    x[1, 700] = x[1, 4500] = 50.0  # a tie across chunks: the first index wins
    x[2, 10] = x[2, 11] = 50.0  # a tie inside one block
    x[3] = 0.0  # every entry tied
    x[4, : vocab - 1] = float("-inf")  # only the last entry is allowed
    q = torch.empty(6, vocab).exponential_(generator=g)
    inv = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.7])  # greedy rows, then random ones
    return x.to(device, dtype), inv.to(device), q.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sample_argmax_kernel_matches_reference(device, dtype):
    """The Triton kernels (Triton's interpreter on CPU) against the torch reference: greedy rows,
    ties, a masked row and noisy rows, on fp32 and bf16 logits."""
    from kiln.ops.sample_argmax import sample_argmax_ref, sample_argmax_triton

    x, inv, q = _argmax_cases(device, dtype)
    expected = sample_argmax_ref(x, inv, q)
    assert expected[:4].tolist() == x[:4].float().argmax(-1).tolist()
    assert expected[1] == 700 and expected[2] == 10 and expected[3] == 0 and expected[4] == 4999
    noisy = x[5].float() * 1.7 - q[5].log()
    assert expected[5] == noisy.argmax()
    assert torch.equal(sample_argmax_triton(x, inv, q), expected)
    assert torch.equal(sample_argmax_triton(x, None, None), x.float().argmax(-1))


def _token_mask(device, vocab, rows, words, seed=0):
    """A TokenMask of random bitmask words for ``rows`` (None: every one of 6 rows), ``words`` wide."""
    from kiln.structured.token_mask import TokenMask

    g = torch.Generator().manual_seed(seed)
    n = 6 if rows is None else len(rows)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (n, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0, :] = 0
    bitmask[0, 3] = 1 << 5  # one token allowed (3 * 32 + 5)
    return TokenMask(bitmask.to(device), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(
    "rows, words",
    [(None, 157), ([5, 1, 4], 157), ([2], 100)],  # every row, some rows, a bitmask narrower than the vocab
    ids=["all-rows", "some-rows", "narrow"],
)
def test_sample_argmax_kernel_applies_the_grammar_mask(device, dtype, rows, words):
    """The grammar's bitmask read inside the Triton kernel (Triton's interpreter on CPU) picks what
    the torch reference picks from the masked logits: greedy and noisy rows, constrained or not."""
    from kiln.ops.sample_argmax import sample_argmax, sample_argmax_ref, sample_argmax_triton

    x, inv, q = _argmax_cases(device, dtype)
    mask = _token_mask(device, x.shape[1], rows, words)
    for args in ((inv, q), (None, None)):
        expected = sample_argmax_ref(mask.apply(x), *args)
        assert torch.equal(sample_argmax_triton(x, *args, mask), expected)
        assert torch.equal(sample_argmax(x, *args, token_mask=mask), expected)  # the dispatch
        unmasked = sample_argmax_ref(x, *args)
        constrained = range(6) if rows is None else rows
        for r in set(range(6)) - set(constrained):
            assert expected[r] == unmasked[r]  # rows without a constraint are untouched
        allowed = unpack_bitmask_rows(mask, x.shape[1])
        masked = mask.apply(x)
        for j, r in enumerate(constrained):  # an allowed token, unless the mask left none finite
            assert allowed[j, expected[r]] or masked[r].isinf().all()
    if rows is None:
        assert expected[0] == 3 * 32 + 5


def unpack_bitmask_rows(mask, vocab):
    from kiln.structured.token_mask import unpack_bitmask

    return unpack_bitmask(mask.bitmask.cpu(), vocab)


def test_sample_argmax_needs_noise_and_temperatures_together():
    from kiln.ops.sample_argmax import sample_argmax

    with pytest.raises(ValueError, match="inv_temp"):
        sample_argmax(torch.zeros(1, 4), torch.ones(1), None)


def test_temperature_sharpens_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0] + [-30.0] * (VOCAB - 3)])
    tokens = draws(SamplingParams(temperature=0.5), logits, n=20000)
    freq = torch.bincount(tokens, minlength=VOCAB)[:3].float() / len(tokens)
    assert torch.allclose(freq, (logits[0, :3] / 0.5).softmax(-1), atol=0.02)


@pytest.mark.gpu
def test_sampling_on_cuda_never_waits_for_the_device():
    """A host sync in the sampler would wait for the step launched before it and undo the engine's
    overlap of host and device work; CUDA's sync debug mode turns any such wait into an error."""
    variants = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[3], logit_bias={5: 2.0}),
        SamplingParams(
            temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, allowed_token_ids=[1, 2, 9]
        ),
    ]
    seqs = [s for i, p in enumerate(variants) for s in seqs_for(p, 2, prompt=(i, i + 1))]
    logits = torch.randn(len(seqs), 128256, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(logits, seqs, gen).tokens
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (len(seqs),) and tokens.is_cuda
    assert set(tokens[6:].tolist()) <= {1, 2, 9}
