"""Triton kernels of ``kiln.ops.sample_argmax`` (imported on the first CUDA call, so ``import kiln`` does
not import Triton)."""

import torch
import triton
import triton.language as tl

from kiln.ops.sample_argmax import BLOCK, CHUNK

_NO_INDEX = tl.constexpr(2**31 - 1)  # above any vocabulary index


# the bitmask's width is the grammar's vocabulary (the tokenizer's), not the model's: left unspecialised,
# start-up's warm-up of the masked variants holds for any tokenizer
@triton.jit(do_not_specialize=["mask_words"])
def _chunk_best_kernel(
    x_ptr,
    q_ptr,
    inv_ptr,
    mask_ptr,
    mask_row_ptr,
    val_ptr,
    idx_ptr,
    vocab,
    stride_x,
    stride_q,
    mask_words,
    num_chunks,
    NOISE: tl.constexpr,
    MASK: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    inv = 0.0
    if NOISE:
        inv = tl.load(inv_ptr + row)
    mask_row = -1  # the row's grammar bitmask row (int32 words, bit t % 32 of word t // 32: t allowed)
    if MASK:
        mask_row = tl.load(mask_row_ptr + row).to(tl.int64)
    lo = chunk * CHUNK
    best_v = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = lo + tl.arange(0, BLOCK)
    for start in range(lo, lo + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < vocab
        v = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=float("-inf")).to(tl.float32)
        if NOISE:
            if inv != 0.0:
                q = tl.load(q_ptr + row * stride_q + offs, mask=ok, other=1.0)
                v = tl.where(ok, v * inv - tl.log(q), float("-inf"))
        if MASK:
            if mask_row >= 0:  # tokens past the bitmask's words are never allowed
                word = offs // 32
                in_mask = ok & (word < mask_words)
                bits = tl.load(mask_ptr + mask_row * mask_words + word, mask=in_mask, other=0)
                v = tl.where(((bits >> (offs % 32)) & 1) != 0, v, float("-inf"))
        better = v > best_v  # strict: each lane keeps its first maximum
        best_v = tl.where(better, v, best_v)
        best_i = tl.where(better, offs, best_i)
    top = tl.max(best_v, 0)
    first = tl.min(tl.where(best_v == top, best_i, _NO_INDEX), 0)
    tl.store(val_ptr + row * num_chunks + chunk, top)
    tl.store(idx_ptr + row * num_chunks + chunk, first)


@triton.jit
def _best_chunk_kernel(val_ptr, idx_ptr, out_ptr, num_chunks, CHUNKS_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_P2)
    ok = offs < num_chunks
    v = tl.load(val_ptr + row * num_chunks + offs, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + row * num_chunks + offs, mask=ok, other=_NO_INDEX)
    top = tl.max(v, 0)
    tl.store(out_ptr + row, tl.min(tl.where(v == top, i, _NO_INDEX), 0).to(tl.int64))


def sample_argmax_triton(
    logits: torch.Tensor, inv_temp: torch.Tensor | None, q: torch.Tensor | None, token_mask=None
):
    rows, vocab = logits.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    vals = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    noise, masked = q is not None, token_mask is not None
    bitmask = token_mask.bitmask.contiguous() if masked else None
    _chunk_best_kernel[(rows, num_chunks)](
        logits,
        q if noise else logits,
        inv_temp if noise else logits,
        bitmask if masked else logits,
        token_mask.row_map(rows) if masked else logits,
        vals,
        idxs,
        vocab,
        logits.stride(0),
        q.stride(0) if noise else 0,
        bitmask.shape[1] if masked else 0,
        num_chunks,
        NOISE=noise,
        MASK=masked,
        CHUNK=CHUNK,
        BLOCK=BLOCK,
        num_warps=4,
    )
    _best_chunk_kernel[(rows,)](vals, idxs, out, num_chunks, CHUNKS_P2=triton.next_power_of_2(num_chunks))
    return out
