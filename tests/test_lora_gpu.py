"""LoRA on the GPU (skipped without CUDA): the Triton kernels at model shapes, and the peft oracle in
fp32 (exact) and bf16 (stated tolerance) with compilation, full and piecewise CUDA graphs on.

bf16 tolerance: logprobs within 0.1 nats of peft's (peft keeps the LoRA path in fp32, kiln rounds the
rank-r activations to bf16), and a greedy token may differ only where peft's top two candidates are
within 0.1 nats (a near tie); that prompt's comparison stops there."""

import pytest
import torch
from lora_oracle import check_outputs, mixed_batch, reference_cases

from kiln import LLM, SamplingParams
from kiln.ops.lora_ref import lora_add_ref_

pytestmark = pytest.mark.gpu
MAX_TOKENS = 8
LORA_KWARGS = dict(enable_lora=True, max_loras=3, max_lora_rank=16)
# full graphs for decode batches up to 16, piecewise graphs up to 256 tokens: the mixed batch's first step
# (12 prompts, ~160 tokens) replays the 256-token piecewise graphs (segment-grouped kernels), decode steps
# the full graphs (gathered kernels)
GRAPHS = {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256]}


@pytest.fixture(scope="module")
def fp32_cases(tiny_checkpoint, tmp_path_factory):
    return reference_cases(tiny_checkpoint, tmp_path_factory, MAX_TOKENS, device="cuda")


@pytest.fixture(scope="module")
def bf16_cases(tiny_checkpoint, tmp_path_factory):
    return reference_cases(tiny_checkpoint, tmp_path_factory, MAX_TOKENS, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("num_tokens", [1, 4, 7, 16, 64, 129, 1000])
@pytest.mark.parametrize("shape", [(4096, [4096, 1024, 1024]), (14336, [4096]), (2048, [8192, 8192])])
def test_kernels_at_model_shapes(num_tokens, shape):
    """bf16, llama-8b/1b projection shapes, rank 16, 4 slots; every kernel plan by token count and K
    (fused up to 4 tokens and K 4096, split up to 16 tokens, grouped above)."""
    k, slices = shape
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    x = torch.randn(num_tokens, k, **kw)
    a = torch.randn(4, len(slices), 16, k, **kw) * 0.02
    b = torch.randn(4, sum(slices), 16, **kw) * 0.02
    y = torch.randn(num_tokens, sum(slices), **kw)
    slots = torch.randint(-1, 4, (num_tokens,), device="cuda", generator=gen).to(torch.int32)
    order = torch.cat([(slots == s).nonzero().squeeze(1) for s in range(4)]).to(torch.int32)
    counts = torch.stack([(slots == s).sum() for s in range(4)])
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    out, ref = y.clone(), y.clone()
    torch.ops.kiln.lora_add(out, x, a, b, slots, order, starts, slices)
    lora_add_ref_(ref, x, a, b, slots, slices)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    rows = slots >= 0
    assert torch.equal(out[~rows], y[~rows])


def _run(llm, ids, requests, refs, **tol):
    prompts, loras, keys = mixed_batch(ids, requests)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    check_outputs(outputs, keys, refs, loras, **tol)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp32_in_cuda_graphs_matches_peft(arch, fp32_cases):
    """Default compilation on CUDA: full graphs for decode, piecewise graphs for prefill; exact."""
    base, ids, requests, refs = fp32_cases(arch)
    kwargs = dict(dtype="float32", max_num_seqs=16, max_model_len=256, compilation_config=GRAPHS)
    with LLM(base, **kwargs, **LORA_KWARGS) as llm:
        graphs = llm.llm_engine.worker.graphs
        before = [dict(w.graphs) for w in graphs.wrappers]
        assert graphs.captured("full") and graphs.captured("piecewise")
        _run(llm, ids, requests, refs)
        assert graphs.replays("full") > 0 and graphs.replays("piecewise") > 0
        # adapters swapped into slots after capture: the same graphs replayed, none recaptured
        assert [dict(w.graphs) for w in graphs.wrappers] == before
        assert llm.compile_report().recompilations == 0


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("eager", [True, False])
def test_bf16_matches_peft(arch, eager, bf16_cases):
    base, ids, requests, refs = bf16_cases(arch)
    kwargs = dict(dtype="bfloat16", max_num_seqs=16, max_model_len=256, enforce_eager=eager)
    if not eager:
        kwargs["compilation_config"] = GRAPHS
    with LLM(base, **kwargs, **LORA_KWARGS) as llm:
        _run(llm, ids, requests, refs, logprob_tol=0.1, tie_margin=0.1)
        if not eager:
            graphs = llm.llm_engine.worker.graphs
            assert graphs.replays("full") > 0 and graphs.replays("piecewise") > 0


def test_bf16_slot_swaps_under_graphs(bf16_cases):
    """max_loras=1 with three adapters: swap-ins between graph replays keep the outputs right."""
    base, ids, requests, refs = bf16_cases("llama")
    kwargs = dict(dtype="bfloat16", max_num_seqs=16, max_model_len=256, enable_lora=True, max_loras=1)
    kwargs["compilation_config"] = GRAPHS
    with LLM(base, **kwargs) as llm:
        _run(llm, ids, requests, refs, logprob_tol=0.1, tie_margin=0.1)
        assert llm.llm_engine.lora.num_swap_ins >= 3


def test_bf16_chunked_prefill_and_preemption_under_graphs(bf16_cases):
    """Prefill chunks of 32 tokens and a KV cache of 8 blocks (preemption), inside CUDA graphs."""
    base, ids, requests, refs = bf16_cases("llama")
    block_bytes = 2 * 2 * 16 * 2 * 32 * 2  # K+V, 2 layers, 16 slots, 2 kv heads, head_dim 32, bf16
    kwargs = dict(
        dtype="bfloat16",
        max_num_seqs=16,
        max_num_batched_tokens=32,
        kv_cache_memory_bytes=8 * block_bytes,
        compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]},
    )
    with LLM(base, **kwargs, **LORA_KWARGS) as llm:
        _run(llm, ids, requests, refs, logprob_tol=0.1, tie_margin=0.1)
        assert llm.llm_engine.scheduler.num_preemptions > 0
        graphs = llm.llm_engine.worker.graphs
        assert graphs.replays("full") > 0 and graphs.replays("piecewise") > 0
