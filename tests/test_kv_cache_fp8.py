"""``kv_cache_dtype="fp8"``: K/V stored as float8_e4m3fn with per-layer scales.

The torch reference is the oracle of the Triton kernels (run by Triton's interpreter on CPU): the
store kernel writes the same fp8 values, decode and prefill over an fp8 cache match the reference.
The reference itself equals attention over the dequantized cache exactly.
"""

import pytest
import torch
from fp8_oracle import kiln_logits, rel_error
from oracle import assert_greedy_agrees
from test_triton_attention import DECODE, MIXED, make_batch

from kiln import LLM, SamplingParams
from kiln.models.config import ModelConfig
from kiln.models.loader import build_model, read_config
from kiln.ops.attention_ref import paged_attention_ref, store_kv_ref
from kiln.ops.triton_attention import paged_attention_triton, store_kv_triton

E4M3 = torch.float8_e4m3fn
DEV = "cuda" if torch.cuda.is_available() else "cpu"
IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 338, 553, 2056, 28, 1488, 2994, 30, 4, 99, 7, 12]


def fp8_batch(seqs, num_heads, num_kv_heads, head_dim, dtype, k_scale, v_scale, device=DEV):
    q, cache, md = make_batch(seqs, num_heads, num_kv_heads, head_dim, dtype=dtype, device=device)
    cache = cache.float() * 4.0  # K/V of magnitude up to ~20: some values need the scales
    scales = torch.tensor([k_scale, v_scale], device=cache.device).view(2, 1, 1, 1, 1)
    return q, (cache / scales).clamp(-448, 448).to(E4M3), md


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.05, 0.02)])
def test_store_kv_fp8(src_dtype, k_scale, v_scale):
    g = torch.Generator().manual_seed(3)
    heads, dim, tokens = 2, 64, 37
    qkv = torch.randn(tokens, 5 * heads * dim, generator=g) * torch.logspace(-3, 2.5, tokens)[:, None]
    qkv = qkv.to(src_dtype)
    k = qkv[:, : heads * dim].view(tokens, heads, dim)
    v = qkv[:, 3 * heads * dim : 4 * heads * dim].view(tokens, heads, dim)
    slots = torch.randperm(6 * 16, generator=g)[:tokens]
    slots[::5] = -1
    cache = torch.zeros(2, 6, 16, heads, dim, dtype=E4M3)
    k, v, slots, cache = (t.to(DEV) for t in (k, v, slots, cache))
    expected = cache.clone()
    store_kv_ref(k, v, expected, slots, k_scale, v_scale)
    store_kv_triton(k, v, cache, slots, k_scale, v_scale)
    assert torch.equal(cache.float(), expected.float())
    stored = expected[0].flatten(0, 1)[slots[slots >= 0].cpu()].float() * k_scale
    original = k[slots >= 0].float()
    fits = original.abs() <= 448 * k_scale
    err = (stored - original).abs()
    assert (err[fits] <= original.abs()[fits] * 2**-4 + 2**-10 * k_scale).all()  # half a step
    assert torch.equal(stored[~fits], original[~fits].sign() * 448 * k_scale)  # saturated
    assert fits.any() and (~fits).any()  # both cases exercised


def test_reference_dequantizes_exactly():
    q, cache, md = fp8_batch(MIXED, 4, 2, 64, torch.float32, 0.05, 0.02)
    got = paged_attention_ref(q, cache, md, 0.125, k_scale=0.05, v_scale=0.02)
    dequant = cache.float() * torch.tensor([0.05, 0.02], device=cache.device).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(got, paged_attention_ref(q, dequant, md, 0.125), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqs,num_splits", [(DECODE + [(300, 1)], 3), (DECODE, 1), (MIXED, None)])
def test_attention_over_fp8_cache(dtype, seqs, num_splits):
    k_scale, v_scale = 0.05, 0.02
    q, cache, md = fp8_batch(seqs, 8, 2, 64, dtype, k_scale, v_scale)
    ref = paged_attention_ref(q, cache, md, 0.125, 0, k_scale=k_scale, v_scale=v_scale)
    kw = {} if num_splits is None else {"num_splits": num_splits}
    out = paged_attention_triton(q, cache, md, 0.125, 0, k_scale=k_scale, v_scale=v_scale, **kw)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_sliding_window_over_fp8_cache():
    q, cache, md = fp8_batch(MIXED, 4, 2, 64, torch.float32, 1.0, 1.0)
    ref = paged_attention_ref(q, cache, md, 0.125, 24)
    out = paged_attention_triton(q, cache, md, 0.125, 24)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_model_with_fp8_kv_cache(tiny_checkpoint):
    """fp8 K/V (scale 1.0) vs the fp32 cache on a tiny fp32 model: measured 5.7% relative L2 logits
    (this random model's K/V are small, so many land on fp8's coarse subnormal steps)."""
    path = tiny_checkpoint("llama")
    cfg = ModelConfig.from_dict(read_config(path))
    model = build_model(path, cfg, torch.float32, torch.device("cpu"))
    fp8 = kiln_logits(model, IDS, kv_dtype=E4M3)
    full = kiln_logits(model, IDS)
    assert 1e-3 < rel_error(fp8, full) < 0.1


def test_llm_fp8_kv_cache_backends_agree(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS[:5]}]
    budget = 2**20
    tokens, blocks = {}, {}
    for backend, kv in (("torch", "auto"), ("torch", "fp8"), ("triton", "fp8_e4m3")):
        with LLM(
            path,
            enforce_eager=True,
            dtype="float32",
            kv_cache_dtype=kv,
            kv_cache_memory_bytes=budget,
            attention_config={"backend": backend},
        ) as llm:
            assert llm.llm_engine.kv_caches[0].dtype == (torch.float32 if kv == "auto" else E4M3)
            outs = llm.generate(prompts, params, use_tqdm=False)
            tokens[backend, kv] = [o.outputs[0].token_ids for o in outs]
            blocks[kv] = llm.llm_engine.num_blocks
    assert tokens["torch", "fp8"] == tokens["triton", "fp8_e4m3"]
    assert blocks["fp8"] == 4 * blocks["auto"]  # 1 byte per element instead of 4


@pytest.mark.parametrize("value", ["int8", "fp8_e5m2", "float16", None])
def test_bad_kv_cache_dtype(value, tiny_checkpoint):
    with pytest.raises(ValueError, match=r"kv_cache_dtype: unsupported value .*'auto', 'fp8', 'fp8_e4m3'"):
        LLM(tiny_checkpoint("llama"), enforce_eager=True, kv_cache_dtype=value)


# --- GPU: realistic sizes, fp8-KV vs bf16-KV ------------------------------------------------------


GPU_BATCHES = [[(4096, 1)] * 8, [(1000, 1), (4000, 1), (513, 1)], [(512, 512), (2048, 64)]]


@pytest.mark.gpu
@pytest.mark.parametrize("seqs", GPU_BATCHES)
def test_gpu_fp8_kv_attention_vs_bf16(seqs):
    """Attention over the fp8 copy of a bf16 cache vs over the bf16 cache: within 6.25% (max abs error
    relative to the output's max), half of e4m3's relative step 2**-3 — the rounding of K/V to 3
    mantissa bits (values below 2**-6 lose more as subnormals); a wrong scale or layout is far off."""
    q, cache, md = make_batch(seqs, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    cache8 = cache.float().clamp(-448, 448).to(E4M3)
    out16 = paged_attention_triton(q, cache, md, 128**-0.5)
    out8 = paged_attention_triton(q, cache8, md, 128**-0.5)
    ref8 = paged_attention_ref(q, cache8, md, 128**-0.5)
    torch.testing.assert_close(out8.float(), ref8.float(), atol=2e-2, rtol=2e-2)
    assert (out8.float() - out16.float()).abs().max() <= 0.0625 * out16.float().abs().max()


@pytest.mark.gpu
def test_gpu_fp8_kv_generate(tiny_checkpoint):
    """Greedy decoding over an fp8 KV cache follows the bf16 one (oracle.assert_greedy_agrees): the
    tiny random model's logits are nearly flat, so rounding K/V may flip a near-tie and move a logprob
    by ~0.15; a wrong scale or layout moves them by whole units."""
    path = tiny_checkpoint("llama")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    prompts = [{"prompt_token_ids": IDS}]
    with LLM(path, dtype="bfloat16") as llm:
        base = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0]
    with LLM(path, dtype="bfloat16", kv_cache_dtype="fp8") as llm:
        fp8 = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0]
    assert_greedy_agrees(base, fp8, tol=0.3)
