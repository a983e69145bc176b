"""Split-K (flash-decoding) paged attention for pure-decode steps (every query_len is 0 or 1).

Grid ``(num_seqs, num_kv_heads, num_splits)``. A sequence uses ``min(num_splits, cdiv(len, min_split))``
of its splits (``len``: the visible context, the last ``sliding_window`` positions or all of it), so
short contexts leave the other programs to exit at once; its context is cut into that many chunks of
``cdiv(cdiv(len, splits), BLOCK_N) * BLOCK_N`` positions, all computed in the kernel from ``seq_lens``.
Each program runs the shared online-softmax loop (``attend_context``) over one chunk for the query
rows of all heads of its GQA group (one ``tl.dot`` over the group, padded to 16 rows). A sequence with
one split writes its output directly; otherwise each program writes its unnormalised fp32 accumulator
with the running max and sum to a workspace ``[num_seqs, num_heads, num_splits, head_dim_p2]`` (empty
chunks write max -inf, sum 0), and a second kernel, one program per (sequence, head), combines them.
The second launch costs less than combining inside the split kernel did (the last split to finish
merging the others serially, found by an atomic ticket): on the H200 that merge added 8-17 us per layer
at batch 1 and grew with the split count, which is what few long sequences need
(``benchmarks/decode_sweep.py``).

``num_splits`` is a launch parameter chosen by the caller from shapes only, so one captured graph
replays correctly for any ``seq_lens`` that fit the block table.
"""

import torch
import triton
import triton.language as tl

from kiln.ops.metadata import AttentionMetadata
from kiln.ops.triton_prefill import attend_context, compute_dtype, kernel_flags


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])  # batch-dependent: one compile, not one per value
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    ws_acc_ptr,
    ws_ml_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    window,
    qk_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_blk,
    stride_slot,
    stride_kvh,
    num_heads,
    num_splits,
    min_split,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    DIRECT: tl.constexpr,
    SLIDING: tl.constexpr,
    KV_FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) == q_start:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_lo = 0
    if SLIDING:
        ctx_lo = tl.maximum(seq_len - window, 0)
    # this sequence's splits: at most num_splits, each at least min_split positions
    splits = tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len - ctx_lo, min_split)), 1)
    if split >= splits:
        return
    chunk = tl.cdiv(tl.cdiv(seq_len - ctx_lo, splits), BLOCK_N) * BLOCK_N
    lo = ctx_lo + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N

    offs_g = tl.arange(0, GROUP_P2)
    head = kvh * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = offs_d < HEAD_DIM
    io_mask = (offs_g < GROUP)[:, None] & d_ok[None, :]
    q_off = q_start.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=io_mask, other=0.0)
    if not KV_FP8:
        q = q.to(k_ptr.dtype.element_ty)
    q_pos = tl.zeros([GROUP_P2], dtype=tl.int32)  # unused: no causal or window mask needed here

    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kvh * stride_kvh
    v_base = v_ptr + kvh * stride_kvh
    acc, m_i, l_i = attend_context(
        q, k_base, v_base, bt_row, lo, full_end, hi, q_pos, window, qk_scale, stride_blk, stride_slot,
        offs_d, d_ok, GROUP_P2, HEAD_DIM_P2, BLOCK_N, BLOCK_SIZE, False, False, HEAD_DIM != HEAD_DIM_P2,
        PRECISION, UPCAST,
    )  # fmt: skip

    if (splits == 1) | DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if KV_FP8:
            out = out * v_scale
        o_off = q_start.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=io_mask)
    else:  # partial result, combined by _decode_merge_kernel
        row = (seq.to(tl.int64) * num_heads + head) * num_splits + split
        tl.store(ws_acc_ptr + row[:, None] * HEAD_DIM_P2 + offs_d[None, :], acc, mask=io_mask)
        ml_mask = offs_g < GROUP
        tl.store(ws_ml_ptr + row * 2, m_i, mask=ml_mask)
        tl.store(ws_ml_ptr + row * 2 + 1, l_i, mask=ml_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    o_ptr,
    ws_acc_ptr,
    ws_ml_ptr,
    qsl_ptr,
    seq_lens_ptr,
    window,
    v_scale,
    stride_ot,
    stride_oh,
    num_heads,
    num_splits,
    min_split,
    SPLIT_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    SLIDING: tl.constexpr,
):
    """Grid ``(num_seqs, num_heads)``: one head's split results combined. The common max comes first
    (from the small max/sum records), so the partial accumulators are then summed with weights known in
    advance: their loads do not wait on each other."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) == q_start:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_lo = 0
    if SLIDING:
        ctx_lo = tl.maximum(seq_len - window, 0)
    splits = tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len - ctx_lo, min_split)), 1)
    if splits == 1:  # the split kernel wrote this sequence's output itself
        return
    rows = (seq.to(tl.int64) * num_heads + head) * num_splits
    offs_s = tl.arange(0, SPLIT_TILE)
    m_max = tl.full([SPLIT_TILE], float("-inf"), dtype=tl.float32)
    for s0 in range(0, splits, SPLIT_TILE):
        ok = (s0 + offs_s) < splits
        m_max = tl.maximum(m_max, tl.load(ws_ml_ptr + (rows + s0 + offs_s) * 2, mask=ok, other=float("-inf")))
    m_all = tl.max(m_max, 0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = offs_d < HEAD_DIM
    total = tl.zeros([HEAD_DIM_P2], dtype=tl.float32)
    denom = tl.zeros([SPLIT_TILE], dtype=tl.float32)
    for s0 in range(0, splits, SPLIT_TILE):
        ok = (s0 + offs_s) < splits
        r = rows + s0 + offs_s
        m_s = tl.load(ws_ml_ptr + r * 2, mask=ok, other=float("-inf"))
        l_s = tl.load(ws_ml_ptr + r * 2 + 1, mask=ok, other=0.0)
        a_ptr = ws_acc_ptr + r[:, None] * HEAD_DIM_P2 + offs_d[None, :]
        a_s = tl.load(a_ptr, mask=ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.exp2(m_s - m_ref)
        total += tl.sum(a_s * w[:, None], 0)
        denom += l_s * w
    d = tl.sum(denom, 0)
    out = total / tl.where(d == 0.0, 1.0, d) * v_scale  # fp8 cache: V's scale (1.0 otherwise)
    o_off = q_start.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(o_ptr + o_off + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


MERGE_SPLIT_TILE = 32  # split results per load in the merge: one warp holds 32 x head_dim fp32


def _decode_config(head_dim_p2: int, elem_size: int, split: bool) -> dict:
    """Tile and warps for bf16/fp16. Without splits (many sequences), from a sweep on the H100 (batch
    1-32, context 256-2048): two warps per program beat four by up to 1.6x at head_dim 128 and tie at 64.
    With splits (few sequences: many small programs), one warp over 16-token tiles, from a sweep on the
    H200 (``benchmarks/decode_sweep.py``, batch 1-8, context 4096-32768)."""
    if elem_size == 4 or head_dim_p2 > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    if split:
        return dict(BLOCK_N=16, num_warps=1, num_stages=2)
    return dict(BLOCK_N=64, num_warps=2, num_stages=2)


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int,
    out: torch.Tensor,
    num_splits: int,
    config: dict | None = None,
    min_split: int = 1,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_seqs = md.num_seqs
    group = num_heads // num_kv_heads
    group_p2 = max(16, triton.next_power_of_2(group))
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    elem = torch.empty((), dtype=compute_dtype(q, kv_cache)).element_size()
    cfg = config or _decode_config(head_dim_p2, elem, num_splits > 1)
    if num_splits > 1:
        f32 = dict(dtype=torch.float32, device=q.device)
        ws_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim_p2, **f32)
        ws_ml = torch.empty(num_seqs, num_heads, num_splits, 2, **f32)
    else:
        ws_acc = ws_ml = out  # unused
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        kv_cache[0],
        kv_cache[1],
        out,
        ws_acc,
        ws_ml,
        md.query_start_loc,
        md.seq_lens,
        md.block_tables,
        sliding_window,
        scale * k_scale * 1.4426950408889634,
        v_scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        md.block_tables.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_heads,
        num_splits,
        min_split,
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        DIRECT=num_splits == 1,
        SLIDING=sliding_window > 0,
        **kernel_flags(q, kv_cache),
        **cfg,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            out,
            ws_acc,
            ws_ml,
            md.query_start_loc,
            md.seq_lens,
            sliding_window,
            v_scale,
            out.stride(0),
            out.stride(1),
            num_heads,
            num_splits,
            min_split,
            SPLIT_TILE=MERGE_SPLIT_TILE,
            HEAD_DIM=head_dim,
            HEAD_DIM_P2=head_dim_p2,
            SLIDING=sliding_window > 0,
            num_warps=1,
        )
