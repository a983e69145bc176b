"""Tiled flash-attention over the paged KV cache, for batches that hold multi-token query chunks.

Work split: one program per (query tile, kv head). A query tile is ``BLOCK_Q`` consecutive query
tokens of one sequence times the ``GROUP`` query heads that share the kv head, flattened into
``BLOCK_M = BLOCK_Q * GROUP_P2`` rows (row ``r`` is token ``r // GROUP_P2``, head ``r % GROUP_P2``),
so each K/V tile loaded from the cache feeds one ``tl.dot`` for the whole GQA group.

Tile numbering: the tiles of sequence ``i`` are numbered from ``query_start_loc[i] // BLOCK_Q + i``.
That reserves at least ``cdiv(query_len, BLOCK_Q)`` numbers per sequence (at most one to spare), so
the grid ``num_tokens // BLOCK_Q + num_seqs`` depends on shapes only; each program finds its sequence
by binary search over ``query_start_loc`` and spare programs exit at once. Within a sequence tiles run
last-first, so the longest (latest) query tiles start earliest.

KV loop (``attend_context`` and its ``attend_kv_range``, shared with the decode kernel): ``BLOCK_N`` key
positions at a time are gathered through the block table (position ``p`` lives in block
``block_tables[seq, p // block_size]`` at offset ``p % block_size``), scores ``Q K^T`` and the online
softmax (base 2, running max and sum) are kept in fp32, and ``P V`` is accumulated in fp32. Loaded K/V
tiles are cast to the dtype of the dots (``q``'s): a no-op for caches in the model dtype; an fp8 cache
is dequantized there, its ``k_scale`` folded into the score scale and ``v_scale`` applied to the output.
Key tiles wholly at or before the tile's first query position run without causal mask or bounds checks; the
remaining tiles up to the tile's last query position are masked. A sliding window starts the loop at the
first tile any row can see and masks per row. Decode sequences inside a mixed batch are one-token tiles
of this kernel.
"""

import torch
import triton
import triton.language as tl

from kiln import envs
from kiln.ops.metadata import AttentionMetadata

INTERPRET = envs.triton_interpret()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 caches get exact fp32 dots (not tf32); 16-bit dtypes ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def compute_dtype(q: torch.Tensor, kv_cache: torch.Tensor) -> torch.dtype:
    """The dtype of the attention dots: the cache's, or the queries' for an fp8 cache."""
    return q.dtype if kv_cache.dtype == torch.float8_e4m3fn else kv_cache.dtype


def kernel_flags(q: torch.Tensor, kv_cache: torch.Tensor) -> dict:
    """Constexpr flags shared by the decode and prefill kernels."""
    dtype = compute_dtype(q, kv_cache)
    return dict(
        KV_FP8=kv_cache.dtype == torch.float8_e4m3fn,
        PRECISION=dot_precision(dtype),
        UPCAST=INTERPRET and dtype == torch.bfloat16,
    )


@triton.jit
def attend_kv_range(
    acc,
    m_i,
    l_i,
    q,
    k_ptr,
    v_ptr,
    bt_row_ptr,
    lo,
    hi,
    q_pos,
    window,
    qk_scale,
    stride_blk,
    stride_slot,
    offs_d,
    d_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    CHECK_N: tl.constexpr,
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with key positions ``[lo, hi)`` of one sequence.

    ``k_ptr``/``v_ptr`` point at the kv head's element 0 of block 0; ``CHECK_N`` masks positions
    ``>= hi`` (needed unless ``hi - lo`` is a multiple of BLOCK_N). Scores are in log2 units.
    ``UPCAST`` computes the dots in fp32 (only for Triton's interpreter, which has no bf16 ``tl.dot``).
    """
    if UPCAST:
        q = q.to(tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if CHECK_N:
            n_ok = offs_n < hi
            blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE).to(tl.int64)
        kv_off = (blk * stride_blk + (offs_n % BLOCK_SIZE) * stride_slot)[:, None] + offs_d[None, :]
        if CHECK_N:
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        elif PAD_D:
            kv_mask = d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptr + kv_off)
        k = k.to(q.dtype)  # no-op unless the cache is fp8 (or UPCAST)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if CHECK_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        if SLIDING:
            s = tl.where(offs_n[None, :] > q_pos[:, None] - window, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)

        if CHECK_N or PAD_D:
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_ptr + kv_off)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attend_context(
    q,
    k_ptr,
    v_ptr,
    bt_row_ptr,
    lo,
    full_end,
    hi,
    q_pos,
    window,
    qk_scale,
    stride_blk,
    stride_slot,
    offs_d,
    d_ok,
    ROWS: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL_TAIL: tl.constexpr,
    SLIDING: tl.constexpr,
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Fresh (acc, m_i, l_i) for ``ROWS`` query rows after key positions ``[lo, hi)``: the tiles up to
    ``full_end`` (a multiple of BLOCK_N from ``lo``) without bounds checks, the rest with them and,
    when ``CAUSAL_TAIL``, with the causal mask."""
    acc = tl.zeros([ROWS, HEAD_DIM_P2], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc, m_i, l_i = attend_kv_range(
        acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, lo, full_end, q_pos, window, qk_scale,
        stride_blk, stride_slot, offs_d, d_ok,
        BLOCK_N, BLOCK_SIZE, False, SLIDING, False, PAD_D, PRECISION, UPCAST,
    )  # fmt: skip
    return attend_kv_range(
        acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, full_end, hi, q_pos, window, qk_scale,
        stride_blk, stride_slot, offs_d, d_ok,
        BLOCK_N, BLOCK_SIZE, CAUSAL_TAIL, SLIDING, True, PAD_D, PRECISION, UPCAST,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])  # batch-dependent: one compile, not one per value
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    num_seqs,
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
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    SLIDING: tl.constexpr,
    KV_FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    # Sequence of this tile: the last i with query_start_loc[i] // BLOCK_Q + i <= pid.
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        go_right = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid
        left = tl.where(go_right, mid + 1, left)
        right = tl.where(go_right, right, mid)
    seq = left - 1

    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    local = pid - (q_start // BLOCK_Q + seq)
    num_tiles = tl.cdiv(q_len, BLOCK_Q)
    if local >= num_tiles:
        return
    tile = num_tiles - 1 - local
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + offs_m // GROUP_P2
    head = kvh * GROUP + offs_m % GROUP_P2
    row_ok = (tok < q_len) & (offs_m % GROUP_P2 < GROUP)
    q_pos = ctx_start + tok
    offs_d = tl.arange(0, HEAD_DIM_P2)
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]

    tok64 = (q_start + tok).to(tl.int64)
    q_off = (tok64 * stride_qt + head * stride_qh)[:, None] + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)
    if not KV_FP8:
        q = q.to(k_ptr.dtype.element_ty)

    first_pos = ctx_start + tile * BLOCK_Q
    hi = ctx_start + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)  # one past the tile's last position
    lo = 0
    if SLIDING:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    full_end = lo + (first_pos + 1 - lo) // BLOCK_N * BLOCK_N

    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kvh * stride_kvh
    v_base = v_ptr + kvh * stride_kvh
    acc, m_i, l_i = attend_context(
        q, k_base, v_base, bt_row, lo, full_end, hi, q_pos, window, qk_scale, stride_blk, stride_slot,
        offs_d, d_ok, BLOCK_M, HEAD_DIM_P2, BLOCK_N, BLOCK_SIZE, True, SLIDING, HEAD_DIM != HEAD_DIM_P2,
        PRECISION, UPCAST,
    )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_FP8:
        out = out * v_scale
    o_off = (tok64 * stride_ot + head * stride_oh)[:, None] + offs_d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=io_mask)


def prefill_config(head_dim_p2: int, group_p2: int, elem_size: int, max_query_len: int) -> dict:
    """Tile sizes: about 128 query rows (tokens x group heads) per program, fewer for short chunks."""
    if elem_size == 4:  # fp32 dots run without tensor cores: smaller tiles keep them in registers
        rows, block_n, num_warps, num_stages = 64, 16, 8, 2
    else:
        rows, block_n, num_warps, num_stages = 128, 64 if head_dim_p2 <= 128 else 32, 4, 3
    block_q = max(1, rows // group_p2)
    block_q = max(min(block_q, triton.next_power_of_2(max(1, max_query_len))), triton.cdiv(16, group_p2))
    return dict(BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int,
    out: torch.Tensor,
    config: dict | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    elem = torch.empty((), dtype=compute_dtype(q, kv_cache)).element_size()
    cfg = config or prefill_config(head_dim_p2, group_p2, elem, md.max_query_len)
    grid = (num_tokens // cfg["BLOCK_Q"] + md.num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q,
        kv_cache[0],
        kv_cache[1],
        out,
        md.query_start_loc,
        md.seq_lens,
        md.block_tables,
        md.num_seqs,
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
        GROUP=group,
        GROUP_P2=group_p2,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        SLIDING=sliding_window > 0,
        **kernel_flags(q, kv_cache),
        **cfg,
    )
