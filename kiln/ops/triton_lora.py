"""Triton kernels of the batched LoRA products (layouts in ``kiln/ops/lora_ref.py``).

``lora_add_triton`` adds every token's delta to ``y`` in place, through one of three kernel plans
picked from the shapes alone (``lora_plan``; the bounds come from ``benchmarks/lora_kernels.py
--sweep`` on an H200, llama-1b and llama-8b shapes at 1, 4 and 16 tokens):

* ``fused`` (up to ``FUSED_MAX_TOKENS`` tokens, ``K <= FUSED_MAX_K``, ``R <= FUSED_MAX_RANK`` and
  ``tokens x K x N / shards < FUSED_MAX_WORK``): one kernel. One program per (token, run of ``cols``
  output columns) reads its token's slot, recomputes the rank-``R`` shrink ``x[t] @ A[slot, s].T`` for
  the shards its columns belong to and adds its columns of the expand. Every program reads ``R x K``
  of ``A`` (from L2 after the first), so the grid aims at ``FUSED_PROGRAMS`` programs in all: about
  the ratio of the H200's L2 bandwidth to one SM's (~5.5 TB/s / ~110 GB/s), where re-reading ``A`` in
  more programs starts to cost more than the per-program shrink it spreads out; ``B`` and ``y``
  (``N x R``, ``N``) are split between them. The shrink's re-reads grow with the work bound above:
  past it (llama-8b's o and gate/up projections at one token, llama-1b's gate/up at four) two
  kernels are faster.
* ``split`` (one token, ``K <= FUSED_MAX_K``, past the fused bound): two kernels gathered per row.
  The shrink splits the input features in chunks of ``K_PER_SPLIT`` over programs, each *storing*
  its partial sums (no zeroed buffer, no atomics); the expand sums the partials of its token's shard
  and adds its column block.
* ``grouped`` (everything else; ``kiln/ops/triton_lora_grouped.py``): tokens sorted by slot, tiles of
  16 tokens of one slot times the slot's weights with ``tl.dot``; three kernels while its shrink splits
  the input features (a zeroed ``h``), two above. From two tokens on, and for long inputs
  (``down_proj``) at one, it beats the gathered kernels.

Every plan's grid depends only on the shapes, never on the slots' contents: programs of tokens without
an adapter (slot -1) and of empty slots exit at once, so a CUDA graph captured once serves every
adapter mix, and rows without an adapter are left untouched.
"""

import torch
import triton
import triton.language as tl

from kiln.ops import triton_lora_grouped as grouped
from kiln.ops.triton_lora_grouped import lora_add_grouped, shard_ends

FUSED_MAX_TOKENS = 4  # up to this many tokens, with inputs up to FUSED_MAX_K features, the fused one
FUSED_MAX_K = 4096  # each fused program reads R x K of A serially: 128 KiB at R 16 and K 4096 in bf16
FUSED_MAX_RANK = 64  # above, the fused kernel's registers spill (sm_90, 8 warps)
FUSED_MAX_WORK = 1 << 24  # ... while tokens x K x N / shards stays below this
FUSED_PROGRAMS = 48  # fused programs aimed at over all tokens (see above; H200: 132 SMs)
K_PER_SPLIT = 512  # input features per split shrink program (a power of two)
_BLOCK_N = 128
# Tiles of the gathered kernels, by the table's rank R (sm_90, bf16): the fused shrink reads 32768
# elements of A per iteration at R 16 (BLOCK_K 2048: in the sweep 17-50% faster than 16384 at every
# projection of llama-1b and llama-8b at one token), 16384 at R 32 (166 registers a thread in 8 warps,
# from ptxas), 8192 above; the split shrink 8192 (one iteration of its 512 features at R 16); expands
# cover 2048 elements of B per block (128 columns at R 16).
_FUSED_TILE = 32768
_SPLIT_TILE = 8192
_EXPAND_TILE = 2048


def lora_plan(num_tokens: int, k: int, rank: int = 16, n: int = 0, shards: int = 1) -> str:
    """The kernel plan of a batch of ``num_tokens`` tokens, ``k`` input features, ``n`` output
    features in ``shards`` slices, table rank ``rank``."""
    if k <= FUSED_MAX_K and rank <= FUSED_MAX_RANK:
        if num_tokens <= FUSED_MAX_TOKENS and num_tokens * k * n < FUSED_MAX_WORK * shards:
            return "fused"
        if num_tokens == 1:
            return "split"
    return "grouped"


def lora_kernels(num_tokens: int, k: int, rank: int = 16, n: int = 0, shards: int = 1) -> int:
    """Kernels one projection's ``lora_add`` launches (zeroing included) under its plan."""
    plan = lora_plan(num_tokens, k, rank, n, shards)
    if plan == "grouped":
        return 3 if num_tokens <= grouped.SPLIT_MAX_TOKENS and k > grouped.K_PER_SPLIT else 2
    return 1 if plan == "fused" else 2


def rows_block_n(rank: int) -> int:
    """Output columns per block of the gathered expands."""
    return max(16, min(_BLOCK_N, _EXPAND_TILE // rank))


def fused_block_k(rank: int, k: int, tile: int | None = None) -> int:
    """Input features per fused shrink iteration."""
    tile = tile or (_FUSED_TILE if rank <= 16 else _FUSED_TILE // 2 if rank <= 32 else _FUSED_TILE // 4)
    return max(16, min(tile // rank, triton.next_power_of_2(k)))


def fused_columns(num_tokens: int, n: int, rank: int = 16, programs: int | None = None) -> int:
    """Output columns per fused program: a multiple of ``rows_block_n``, about ``programs`` programs
    (``FUSED_PROGRAMS``) over all tokens."""
    block_n = rows_block_n(rank)
    runs = max(1, triton.cdiv(programs or FUSED_PROGRAMS, num_tokens))
    return triton.cdiv(triton.cdiv(n, runs), block_n) * block_n


@triton.jit
def _shrink_row(x_row, a_shard, K, stride_ar, R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``x_row[:K] @ a_shard[:, :K].T`` in float32, ``[R]``."""
    r = tl.arange(0, R)
    acc = tl.zeros([R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        xv = tl.load(x_row + k, mask=km, other=0.0).to(tl.float32)
        av = tl.load(a_shard + r[:, None] * stride_ar + k[None, :], mask=km[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    return acc


@triton.jit
def _fused_rows_kernel(
    y_ptr, x_ptr, a_ptr, b_ptr, slots_ptr, K, N, end0, end1, cols,
    stride_yt, stride_xt, stride_al, stride_as, stride_ar, stride_bl, stride_bn,
    R: tl.constexpr, SHARDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    c0 = tl.program_id(1) * cols
    c1 = tl.minimum(c0 + cols, N)
    x_row = x_ptr + t * stride_xt
    a_base = a_ptr + slot * stride_al
    # the shrink of each shard these columns belong to (shard s owns columns [end_{s-1}, end_s))
    h0 = tl.zeros([R], dtype=tl.float32)
    h1 = tl.zeros([R], dtype=tl.float32)
    h2 = tl.zeros([R], dtype=tl.float32)
    if c0 < end0:
        h0 = _shrink_row(x_row, a_base, K, stride_ar, R, BLOCK_K)
    if SHARDS > 1:
        if (c1 > end0) & (c0 < end1):
            h1 = _shrink_row(x_row, a_base + stride_as, K, stride_ar, R, BLOCK_K)
    if SHARDS > 2:
        if c1 > end1:
            h2 = _shrink_row(x_row, a_base + 2 * stride_as, K, stride_ar, R, BLOCK_K)
    wdt = b_ptr.dtype.element_ty  # h rounded to the weights' dtype, as the reference does
    h0, h1, h2 = h0.to(wdt).to(tl.float32), h1.to(wdt).to(tl.float32), h2.to(wdt).to(tl.float32)
    r = tl.arange(0, R)
    b_base = b_ptr + slot * stride_bl
    for n0 in range(c0, c1, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < c1
        h12 = tl.where((n < end1)[:, None], h1[None, :], h2[None, :])
        hv = tl.where((n < end0)[:, None], h0[None, :], h12)  # each column's shard's h
        bv = tl.load(b_base + n[:, None] * stride_bn + r[None, :], mask=nm[:, None], other=0.0)
        delta = tl.sum(hv * bv.to(tl.float32), axis=1)
        y = tl.load(y_ptr + t * stride_yt + n, mask=nm, other=0.0)
        tl.store(y_ptr + t * stride_yt + n, (y.to(tl.float32) + delta).to(y.dtype), mask=nm)


@triton.jit
def _shrink_split_kernel(
    x_ptr, a_ptr, h_ptr, slots_ptr, K,
    stride_xt, stride_al, stride_as, stride_ar, stride_ht, stride_hs,
    R: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
):  # fmt: skip
    """``h[t, s, split] = x[t, chunk] @ A[slot, s, :, chunk].T``: partial sums, stored."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    k_start = tl.program_id(2) * K_PER_SPLIT
    a_shard = a_ptr + slot * stride_al + s * stride_as + k_start
    acc = _shrink_row(x_ptr + t * stride_xt + k_start, a_shard, tl.minimum(K - k_start, K_PER_SPLIT),
                      stride_ar, R, BLOCK_K)  # fmt: skip
    tl.store(h_ptr + t * stride_ht + s * stride_hs + tl.program_id(2) * R + tl.arange(0, R), acc)


@triton.jit
def _expand_split_kernel(
    y_ptr, h_ptr, b_ptr, slots_ptr, N, end0, end1,
    stride_yt, stride_ht, stride_hl, stride_hs, stride_bl, stride_bn,
    R: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``y[t, cols] += (sum of the shard's partials) @ B[slot, cols].T``; ``h`` holds each token's
    partials (``stride_hl`` 0) or every slot's shrink side by side (``stride_hl``: a slot's columns)."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    shard = (n >= end0).to(tl.int32) + (n >= end1).to(tl.int32)  # shard owning each column
    r = tl.arange(0, R)
    h_rows = h_ptr + t * stride_ht + slot * stride_hl + shard[:, None] * stride_hs + r[None, :]
    hv = tl.zeros([BLOCK_N, R], dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        hv += tl.load(h_rows + split * R, mask=nm[:, None], other=0.0)
    bv = tl.load(b_ptr + slot * stride_bl + n[:, None] * stride_bn + r[None, :], mask=nm[:, None], other=0.0)
    delta = tl.sum(hv.to(bv.dtype).to(tl.float32) * bv.to(tl.float32), axis=1)
    y = tl.load(y_ptr + t * stride_yt + n, mask=nm, other=0.0)
    tl.store(y_ptr + t * stride_yt + n, (y.to(tl.float32) + delta).to(y.dtype), mask=nm)


def lora_add_fused(y, x, a, b, token_slots, slice_sizes, programs=None, tile=None, warps=8) -> None:
    """The ``fused`` plan: one kernel. ``programs`` (the grid's aim, ``FUSED_PROGRAMS``), ``tile``
    (elements of ``A`` per shrink iteration) and ``warps`` override the launch."""
    num_tokens, n = y.shape
    k, rank = x.shape[1], a.shape[2]
    end0, end1 = shard_ends(slice_sizes, n)
    cols = fused_columns(num_tokens, n, rank, programs)
    _fused_rows_kernel[(num_tokens, triton.cdiv(n, cols))](
        y, x, a, b, token_slots, k, n, end0, end1, cols,
        y.stride(0), x.stride(0), a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1),
        R=rank, SHARDS=len(slice_sizes), BLOCK_K=fused_block_k(rank, k, tile), BLOCK_N=rows_block_n(rank),
        num_warps=warps,
    )  # fmt: skip


def lora_add_split(y, x, a, b, token_slots, slice_sizes) -> None:
    """The ``split`` plan: a shrink storing per-chunk partials, an expand summing them."""
    num_tokens, n = y.shape
    k, (_, shards, rank, _) = x.shape[1], a.shape
    splits = triton.cdiv(k, K_PER_SPLIT)
    h = torch.empty(num_tokens, shards, splits, rank, dtype=torch.float32, device=x.device)
    _shrink_split_kernel[(num_tokens, shards, splits)](
        x, a, h, token_slots, k, x.stride(0), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1),
        R=rank, BLOCK_K=max(16, min(_SPLIT_TILE // rank, K_PER_SPLIT)), K_PER_SPLIT=K_PER_SPLIT,
    )  # fmt: skip
    end0, end1 = shard_ends(slice_sizes, n)
    block_n = rows_block_n(rank)
    _expand_split_kernel[(num_tokens, triton.cdiv(n, block_n))](
        y, h, b, token_slots, n, end0, end1,
        y.stride(0), h.stride(0), 0, h.stride(1), b.stride(0), b.stride(1),
        R=rank, SPLITS=splits, BLOCK_N=block_n,
    )  # fmt: skip


# the stacked expand gathers per token up to this many tokens, groups tokens by slot above. From
# ``benchmarks/lora_kernels.py --stacked`` on an H200 (``stacked_expand`` against ``stacked_grouped_expand``
# per decode step): gathered is faster at 4 tokens (llama-8b 298 vs 336 us), grouped as fast or faster from
# 16 (llama-8b 343 vs 380 us; llama-1b 161 vs 160), and at 64 (llama-1b 211 vs 281 us)
STACKED_GATHER_MAX_TOKENS = 8


def lora_expand_stacked_triton(y, h, b, token_slots, sorted_tokens, slot_starts, slice_sizes) -> None:
    """The stacked expand by token count: gathered per token up to ``STACKED_GATHER_MAX_TOKENS``,
    grouped by slot above."""
    if y.shape[0] <= STACKED_GATHER_MAX_TOKENS:
        lora_expand_stacked(y, h, b, token_slots, slice_sizes)
    else:
        grouped.lora_expand_stacked_grouped(y, h, b, sorted_tokens, slot_starts, slice_sizes)


def lora_expand_stacked(y, h, b, token_slots, slice_sizes) -> None:
    """The expand after a base product whose weight carries every slot's ``A`` as extra rows
    (``[W; A.view(slots * shards * R, K)]``): ``h`` ``[T, slots * shards * R]`` is that product's
    tail, ``y`` ``[T, N]`` its head (both may be column slices of one output); adds each token's
    ``h[t, its slot's columns] @ B[slot].T`` to ``y`` in place. One kernel: the shrink rode along in
    the base product."""
    num_tokens, n = y.shape
    _, shards_x_rank = h.shape
    rank = b.shape[2]
    shards = len(slice_sizes)
    assert shards_x_rank % (shards * rank) == 0 and h.stride(1) == 1 and y.stride(1) == 1
    end0, end1 = shard_ends(slice_sizes, n)
    block_n = rows_block_n(rank)
    _expand_split_kernel[(num_tokens, triton.cdiv(n, block_n))](
        y, h, b, token_slots, n, end0, end1,
        y.stride(0), h.stride(0), shards * rank, rank, b.stride(0), b.stride(1),
        R=rank, SPLITS=1, BLOCK_N=block_n,
    )  # fmt: skip


def lora_add_triton(y, x, a, b, token_slots, sorted_tokens, slot_starts, slice_sizes) -> None:
    """``y += delta`` in place for the tokens that have an adapter (``x`` contiguous), by ``lora_plan``."""
    plan = lora_plan(x.shape[0], x.shape[1], a.shape[2], y.shape[1], len(slice_sizes))
    if plan == "fused":
        lora_add_fused(y, x, a, b, token_slots, slice_sizes)
    elif plan == "split":
        lora_add_split(y, x, a, b, token_slots, slice_sizes)
    else:
        lora_add_grouped(y, x, a, b, sorted_tokens, slot_starts, slice_sizes)
