"""kiln vs HF transformers on the same tiny random checkpoints: greedy tokens identical, logprobs close,
whatever the batching, chunking, prefix caching or preemption."""

import pytest
from oracle import hf_greedy

from kiln import LLM, SamplingParams

PROMPTS = [
    "Hello, my name is",
    "The capital of France is a city that has been",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22",
    "Once",
    "The capital of France is a city that has many",  # shares a prefix with prompt 2
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            from transformers import AutoTokenizer

            path = tiny_checkpoint(arch)
            tok = AutoTokenizer.from_pretrained(path)
            ids = [tok(p)["input_ids"] for p in PROMPTS]
            cache[arch] = (path, ids, hf_greedy(path, ids, MAX_TOKENS))
        return cache[arch]

    return get


def _check(llm, ids, reference, logprob_tol=1e-3):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    for out, (ref_tokens, ref_logprobs) in zip(outputs, reference):
        got = out.outputs[0]
        assert got.token_ids == ref_tokens
        for step, (token, entry) in enumerate(zip(got.token_ids, got.logprobs)):
            ref = ref_logprobs[step]
            assert abs(entry[token].logprob - ref[token].item()) < logprob_tol
            top = ref.topk(3)
            for t, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(entry[t].logprob - lp) < logprob_tol
            assert entry[token].rank == 1
    return outputs


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_hf(arch, references):
    path, ids, reference = references(arch)
    with LLM(path, enforce_eager=True, dtype="float32") as llm:
        _check(llm, ids, reference)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_on_and_off(prefix_caching, references):
    path, ids, reference = references("llama")
    with LLM(
        path, enforce_eager=True, dtype="float32", enable_prefix_caching=prefix_caching, block_size=4
    ) as llm:
        _check(llm, ids, reference)
        outputs = _check(llm, ids, reference)  # second pass: prompts' full blocks are now cached
    cached = [o.num_cached_tokens for o in outputs]
    if prefix_caching:
        assert all(c == (len(p) - 1) // 4 * 4 for c, p in zip(cached, ids))
    else:
        assert cached == [0] * len(ids)


def test_chunked_prefill(references):
    path, ids, reference = references("qwen3")
    with LLM(path, enforce_eager=True, dtype="float32", max_num_batched_tokens=8, max_num_seqs=3) as llm:
        _check(llm, ids, reference)


def test_preemption_keeps_outputs_identical(references):
    path, ids, reference = references("llama")
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4  # K+V, 2 layers, 16 slots, 2 kv heads, head_dim 32, fp32
    with LLM(path, enforce_eager=True, dtype="float32", kv_cache_memory_bytes=6 * block_bytes) as llm:
        _check(llm, ids, reference)
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_overlapped_steps_match_hf_under_preemption_and_chunking(references):
    """Without logprobs, steps overlap (launched before the previous read-back): same tokens."""
    path, ids, reference = references("llama")
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    kwargs = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=6 * block_bytes)
    with LLM(path, max_num_batched_tokens=16, **kwargs) as llm:
        assert llm.llm_engine.async_scheduling
        outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.num_blocks
    assert [o.outputs[0].token_ids for o in outputs] == [tokens for tokens, _ in reference]
