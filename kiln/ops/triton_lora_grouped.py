"""Segment-grouped Triton kernels of the batched LoRA products (the ``grouped`` plan of
``kiln/ops/triton_lora.py``: from two tokens on, and long inputs at one).

Tokens sorted by slot (``sorted_tokens``, slot ``i`` owning
``sorted_tokens[slot_starts[i]:slot_starts[i + 1]]``); one program per (block of a slot's tokens, shard
and chunk of input features or column block, slot) multiplies a tile of tokens by the slot's weights
with ``tl.dot``, so each weight tile is read once per block of 16 tokens, not once per token. Up to
``SPLIT_MAX_TOKENS`` tokens the shrink splits the input features in chunks of ``K_PER_SPLIT`` over
programs, adding into a zeroed ``h``. Programs of empty slots exit at once.
"""

import torch
import triton
import triton.language as tl

SPLIT_MAX_TOKENS = 512  # shrinks of batches up to this many tokens split K over programs
K_PER_SPLIT = 512  # input features per split shrink program (a power of two)
_BLOCK_K = 128
_BLOCK_N = 128
_BLOCK_M = 16


def shard_ends(slice_sizes, n):
    """The first output column of shards 1 and 2 (``n`` for shards a projection lacks)."""
    ends = [sum(slice_sizes[: i + 1]) for i in range(len(slice_sizes) - 1)]
    ends += [n] * (2 - len(ends))
    return ends


@triton.jit
def _segment_rows(sorted_ptr, start, count, BLOCK_M: tl.constexpr):
    """This program's block of the slot's tokens: (token rows, mask)."""
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    im = i < count
    return tl.load(sorted_ptr + start + i, mask=im, other=0).to(tl.int64), im


@triton.jit
def _shrink_grouped_kernel(
    x_ptr, a_ptr, h_ptr, sorted_ptr, starts_ptr, K,
    stride_xt, stride_al, stride_as, stride_ar, stride_ht, stride_hs,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    K_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(1) // SPLITS
    k_start = (tl.program_id(1) % SPLITS) * K_PER_SPLIT
    slot = tl.program_id(2)
    start = tl.load(starts_ptr + slot)
    count = tl.load(starts_ptr + slot + 1) - start
    if tl.program_id(0) * BLOCK_M >= count:
        return
    rows, im = _segment_rows(sorted_ptr, start, count, BLOCK_M)
    r = tl.arange(0, R)
    a_base = a_ptr + slot.to(tl.int64) * stride_al + s * stride_as
    acc = tl.zeros([BLOCK_M, R], dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_start + k0 + tl.arange(0, BLOCK_K)
        km = k < K
        xv = tl.load(
            x_ptr + rows[:, None] * stride_xt + k[None, :], mask=im[:, None] & km[None, :], other=0.0
        )
        av = tl.load(a_base + k[:, None] + r[None, :] * stride_ar, mask=km[:, None], other=0.0)
        if DOT_FP32:
            acc += tl.dot(xv.to(tl.float32), av.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xv, av)
    ptrs = h_ptr + rows[:, None] * stride_ht + s * stride_hs + r[None, :]
    if SPLITS > 1:
        tl.atomic_add(ptrs, acc, mask=im[:, None])
    else:
        tl.store(ptrs, acc, mask=im[:, None])


@triton.jit
def _expand_grouped_kernel(
    y_ptr, h_ptr, b_ptr, sorted_ptr, starts_ptr, N, end0, end1,
    stride_yt, stride_ht, stride_hl, stride_hs, stride_bl, stride_bn,
    R: tl.constexpr, SHARDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """``y[rows] += h[rows, shard] @ B[slot].T`` per block of a slot's tokens; ``h`` holds each token's
    shrink (``stride_hl`` 0) or every slot's side by side (``stride_hl``: a slot's columns)."""
    slot = tl.program_id(2)
    start = tl.load(starts_ptr + slot)
    count = tl.load(starts_ptr + slot + 1) - start
    if tl.program_id(0) * BLOCK_M >= count:
        return
    rows, im = _segment_rows(sorted_ptr, start, count, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    shard = (n >= end0).to(tl.int32) + (n >= end1).to(tl.int32)
    r = tl.arange(0, R)
    b_base = b_ptr + slot.to(tl.int64) * stride_bl
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    h_base = h_ptr + slot.to(tl.int64) * stride_hl
    for s in tl.static_range(SHARDS):
        hv = tl.load(
            h_base + rows[:, None] * stride_ht + s * stride_hs + r[None, :], mask=im[:, None], other=0.0
        )
        bm = nm & (shard == s)
        bv = tl.load(b_base + n[None, :] * stride_bn + r[:, None], mask=bm[None, :], other=0.0)
        hv = hv.to(bv.dtype)
        if DOT_FP32:
            acc += tl.dot(hv.to(tl.float32), bv.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(hv, bv)
    ptrs = y_ptr + rows[:, None] * stride_yt + n[None, :]
    mask = im[:, None] & nm[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _dot_fp32(weights: torch.Tensor) -> bool:
    """Tile products in exact fp32 (no TF32) for fp32 weights, as the fp32 base model computes them,
    and for CPU tensors (Triton's interpreter, whose bf16 ``tl.dot`` is wrong); bf16/fp16 tensor-core
    products with fp32 accumulation otherwise."""
    return weights.dtype == torch.float32 or not weights.is_cuda


def lora_add_grouped(y, x, a, b, sorted_tokens, slot_starts, slice_sizes) -> None:
    """The ``grouped`` plan: ``h`` zeroed when the shrink splits ``K``, the shrink, the expand."""
    num_tokens, n = y.shape
    k, (slots, shards, rank, _) = x.shape[1], a.shape
    h = torch.empty(num_tokens, shards, rank, dtype=torch.float32, device=x.device)
    splits = triton.cdiv(k, K_PER_SPLIT) if num_tokens <= SPLIT_MAX_TOKENS else 1
    k_per_split = K_PER_SPLIT if splits > 1 else triton.cdiv(k, _BLOCK_K) * _BLOCK_K
    if splits > 1:
        h.zero_()
    _shrink_grouped_kernel[(triton.cdiv(num_tokens, _BLOCK_M), shards * splits, slots)](
        x, a, h, sorted_tokens, slot_starts, k,
        x.stride(0), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1),
        R=rank, BLOCK_M=_BLOCK_M, BLOCK_K=min(_BLOCK_K, k_per_split), DOT_FP32=_dot_fp32(a),
        K_PER_SPLIT=k_per_split, SPLITS=splits,
    )  # fmt: skip
    end0, end1 = shard_ends(slice_sizes, n)
    _expand_grouped_kernel[(triton.cdiv(num_tokens, _BLOCK_M), triton.cdiv(n, _BLOCK_N), slots)](
        y, h, b, sorted_tokens, slot_starts, n, end0, end1,
        y.stride(0), h.stride(0), 0, h.stride(1), b.stride(0), b.stride(1),
        R=rank, SHARDS=len(slice_sizes), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, DOT_FP32=_dot_fp32(b),
    )  # fmt: skip


def lora_expand_stacked_grouped(y, h, b, sorted_tokens, slot_starts, slice_sizes) -> None:
    """``triton_lora.lora_expand_stacked`` grouped by slot: tiles of a slot's tokens times its ``B``
    (read once per tile, not once per token); ``h`` is the product's tail ``[T, slots * shards * R]``."""
    num_tokens, n = y.shape
    slots, _, rank = b.shape
    shards = len(slice_sizes)
    assert h.shape[1] == slots * shards * rank and h.stride(1) == 1 and y.stride(1) == 1
    end0, end1 = shard_ends(slice_sizes, n)
    _expand_grouped_kernel[(triton.cdiv(num_tokens, _BLOCK_M), triton.cdiv(n, _BLOCK_N), slots)](
        y, h, b, sorted_tokens, slot_starts, n, end0, end1,
        y.stride(0), h.stride(0), shards * rank, rank, b.stride(0), b.stride(1),
        R=rank, SHARDS=shards, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, DOT_FP32=_dot_fp32(b),
    )  # fmt: skip
