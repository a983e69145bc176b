"""Triton paged-attention kernels against the torch references in ``kiln.ops.attention_ref``.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the default cases use small shapes; ``gpu``-marked cases repeat them at realistic sizes.
"""

import pytest
import torch

from kiln.ops.attention_ref import paged_attention_ref, store_kv_ref
from kiln.ops.metadata import AttentionMetadata
from kiln.ops.triton_attention import paged_attention_triton, store_kv_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_batch(
    seqs, num_heads, num_kv_heads, head_dim, block_size=16, dtype=torch.float32, seed=0, device=DEV
):
    """Random paged cache, q and metadata for ``seqs`` = [(seq_len, query_len), ...].

    Blocks of each sequence are scattered over the cache; unused block-table entries are random
    valid ids, and q is a strided view into a fused QKV-like buffer.
    """
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(n_blocks) + 4
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(seqs), max(n_blocks) + 2), generator=g)
    used = 0
    for i, n in enumerate(n_blocks):
        tables[i, :n] = perm[used : used + n]
        used += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q_lens = [q_len for _, q_len in seqs]
    num_tokens = sum(q_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(device, dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    starts = torch.tensor([0] + q_lens).cumsum(0)
    md = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64),
        query_start_loc=starts.to(torch.int32),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
        block_tables=tables.to(torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(s for s, _ in seqs),
    )
    md = AttentionMetadata(
        *(t.to(device) for t in (md.slot_mapping, md.query_start_loc, md.seq_lens, md.block_tables)),
        md.max_query_len,
        md.max_seq_len,
    )
    return q, cache.to(device), md


def check_attention(seqs, num_heads, num_kv_heads, head_dim, dtype=torch.float32, sliding_window=0, **kw):
    block_size = kw.pop("block_size", 16)
    device = kw.pop("device", DEV)
    q, cache, md = make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device=device)
    scale = head_dim**-0.5
    ref = paged_attention_ref(q, cache, md, scale, sliding_window)
    out = torch.full_like(ref, float("nan"))
    res = paged_attention_triton(q, cache, md, scale, sliding_window, out=out, **kw)
    assert res is out
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


DECODE = [(1, 1), (16, 1), (37, 1), (130, 1)]
MIXED = [(20, 20), (37, 1), (70, 33), (5, 5), (16, 1), (48, 16)]


# --- store_kv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (1, 128), (3, 80)])
def test_store_kv(dtype, num_kv_heads, head_dim, src_dtype=None, device=DEV):
    g = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_tokens = 6, 16, 21
    qkv = torch.randn(num_tokens, 5 * num_kv_heads * head_dim, generator=g).to(src_dtype or dtype)
    k = qkv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)  # strided views
    v = qkv[:, 3 * num_kv_heads * head_dim : 4 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, -1)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::4] = -1
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    k, v, slots, cache = (t.to(device) for t in (k, v, slots, cache))
    expected = cache.clone()
    store_kv_ref(k, v, expected, slots)
    store_kv_triton(k, v, cache, slots)
    if src_dtype is None or dtype == torch.float32:
        assert torch.equal(cache, expected)
    else:  # the interpreter may round differently when narrowing
        torch.testing.assert_close(cache, expected, atol=0, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_kv_casts(dtype):
    test_store_kv(dtype, 2, 64, src_dtype=torch.float32)


# --- decode (split-K) -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_gqa(num_heads, num_kv_heads, head_dim):
    check_attention(DECODE, num_heads, num_kv_heads, head_dim, num_splits=3)


@pytest.mark.parametrize("num_splits", [None, 1, 2, 7])
def test_decode_splits(num_splits):
    check_attention(DECODE + [(300, 1)], 4, 2, 64, num_splits=num_splits)


def test_decode_merge_over_several_tiles():
    """More splits than the merge kernel loads at once (MERGE_SPLIT_TILE): it combines them in rounds."""
    from kiln.ops.triton_decode import MERGE_SPLIT_TILE

    check_attention([(1500, 1), (40, 1), (1200, 1)], 4, 2, 64, num_splits=MERGE_SPLIT_TILE + 8)


@pytest.mark.parametrize("block_n, warps", [(64, 4), (128, 4), (128, 8)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_wide_tiles(block_n, warps, num_splits):
    """Tiles that ``benchmarks/decode_sweep.py`` tries beside the defaults: several KV blocks per tile,
    contexts shorter than one tile, a partial last tile, with and without splits."""
    from kiln.ops.triton_decode import decode_attention

    q, cache, md = make_batch(DECODE + [(300, 1)], 4, 2, 64)
    ref = paged_attention_ref(q, cache, md, 64**-0.5, 0)
    out = torch.full_like(ref, float("nan"))
    config = dict(BLOCK_N=block_n, num_warps=warps, num_stages=2)
    decode_attention(q, cache, md, 64**-0.5, 0, out, num_splits, config, min_split=32)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half(dtype):
    check_attention(DECODE, 4, 2, 128, dtype, num_splits=4)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_sliding_window(num_splits):
    check_attention(DECODE + [(200, 1)], 4, 2, 64, sliding_window=40, num_splits=num_splits)


def test_decode_odd_head_dim_and_block_size():
    check_attention(DECODE, 6, 2, 80, block_size=8, num_splits=3)
    check_attention(DECODE, 4, 2, 64, block_size=32, num_splits=2)


def test_decode_padded_sequences():
    """Sequences with query_len 0 (graph padding) are skipped; the others are unaffected."""
    q, cache, md = make_batch([(37, 1), (50, 1), (9, 1)], 4, 2, 64)
    md.query_start_loc = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=DEV)
    q = q[:2]
    ref = paged_attention_ref(q, cache, md, 0.125)
    out = paged_attention_triton(q, cache, md, 0.125, num_splits=3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# --- prefill / mixed batches ------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_gqa(num_heads, num_kv_heads, head_dim):
    check_attention(MIXED, num_heads, num_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_half(dtype):
    check_attention(MIXED, 8, 2, 128, dtype)


@pytest.mark.parametrize("sliding_window", [1, 7, 24])
def test_mixed_sliding_window(sliding_window):
    check_attention(MIXED + [(150, 90)], 4, 2, 64, sliding_window=sliding_window)


def test_prefill_chunks_start_mid_block():
    """Later chunks / prefix-cache hits: the query starts at positions 5, 16, 33 and 77."""
    check_attention([(5 + 40, 40), (16 + 3, 3), (33 + 64, 64), (77 + 2, 2)], 8, 4, 64)


def test_prefill_odd_head_dim_and_block_size():
    check_attention(MIXED, 6, 2, 80, block_size=8)
    check_attention(MIXED, 4, 2, 64, block_size=32)


def test_store_then_attend_matches_reference():
    """The op's sequence: store this step's K/V (with padding slots), then attend over the cache."""
    q, cache, md = make_batch([(30, 30), (20, 4), (9, 1)], 4, 2, 64)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(35, 2, 64, generator=g).to(DEV)
    v = torch.randn(35, 2, 64, generator=g).to(DEV)
    tables, bs = md.block_tables.long(), cache.shape[2]
    pos = torch.cat([torch.arange(0, 30), torch.arange(16, 20), torch.arange(8, 9)]).to(DEV)
    seq = torch.repeat_interleave(torch.arange(3, device=DEV), torch.tensor([30, 4, 1], device=DEV))
    slots = tables[seq, pos // bs] * bs + pos % bs
    slots[29] = -1  # a padding token of the first sequence keeps its old cache entry
    ref_cache = cache.clone()
    store_kv_ref(k, v, ref_cache, slots)
    ref = paged_attention_ref(q, ref_cache, md, 0.125)
    store_kv_triton(k, v, cache, slots)
    out = paged_attention_triton(q, cache, md, 0.125)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# --- realistic shapes on a GPU --------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_long_context(dtype):
    seqs = [(1, 1), (100, 1), (1000, 1), (4097, 1), (8192, 1)]
    for num_splits in (None, 1, 16):
        check_attention(seqs, 32, 8, 128, dtype, num_splits=num_splits, device="cuda")
    check_attention(seqs, 32, 8, 128, dtype, sliding_window=4096, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(32, 8, 128), (32, 32, 64), (28, 4, 128), (16, 1, 64)]
)
def test_gpu_mixed_batch(num_heads, num_kv_heads, head_dim):
    seqs = [(2048, 2048), (8192, 512), (3000, 1), (777, 300), (8000, 1), (64, 64)]
    check_attention(seqs, num_heads, num_kv_heads, head_dim, torch.bfloat16, device="cuda")


@gpu
@needs_cuda
def test_gpu_sliding_window_and_fp32():
    seqs = [(2048, 2048), (5000, 700), (6000, 1)]
    check_attention(seqs, 32, 8, 128, torch.bfloat16, sliding_window=1024, device="cuda")
    check_attention(seqs, 16, 4, 96, torch.float32, device="cuda")
    check_attention([(6000, 1), (70, 1)], 16, 4, 96, torch.float32, device="cuda")


@gpu
@needs_cuda
def test_gpu_store_kv():
    test_store_kv(torch.bfloat16, 8, 128, device="cuda")


@gpu
@needs_cuda
def test_gpu_decode_cuda_graph_replay():
    """A decode step captured once replays correctly after seq_lens / block tables change."""
    q, cache, md = make_batch([(8192, 1)] * 8, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    paged_attention_triton(q, cache, md, 0.088, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_triton(q, cache, md, 0.088, out=out)
    g = torch.Generator().manual_seed(5)
    for _ in range(30):  # many replays with new lengths: splits and merge follow seq_lens
        md.seq_lens.copy_(torch.randint(1, 8193, (8,), generator=g))
        md.block_tables.copy_(md.block_tables[torch.randperm(8, generator=g)])
        q.copy_(torch.randn(q.shape, generator=g))
        graph.replay()
        ref = paged_attention_ref(q, cache, md, 0.088)
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


def test_split_count_rule(monkeypatch):
    """Shapes alone decide the split count: one wave of one-warp programs, at least MIN_SPLIT_TOKENS
    of addressable context per split, and no splits at all where fewer than MIN_SPLITS would fit."""
    import kiln.ops.triton_attention as ta

    monkeypatch.setattr(ta, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert ta.choose_num_splits(1, 8, 32768, cpu) == 132  # 8 programs per SM over 8 kv heads
    assert ta.choose_num_splits(1, 8, 4096, cpu) == 4096 // ta.MIN_SPLIT_TOKENS
    assert ta.choose_num_splits(8, 8, 32768, cpu) == 16
    assert ta.choose_num_splits(64, 8, 32768, cpu) == 1  # 2 would fit: not worth the merge launch
    assert ta.choose_num_splits(1, 1, 1 << 20, cpu) == ta.MAX_SPLITS
    assert ta.choose_num_splits(1, 8, 3 * ta.MIN_SPLIT_TOKENS, cpu) == 1
