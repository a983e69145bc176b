"""The sampler's last step: per row, ``argmax(logits * inv_temp - log(q))``, first index on ties.

With ``q ~ Exp(1)`` this draws from ``softmax(logits * inv_temp)`` (the exponential race; ``-log q`` is
Gumbel noise), so no softmax is computed. A row with ``inv_temp == 0`` is greedy: the plain argmax of
its logits, whatever ``q`` holds. Without ``q`` every row is greedy. Any float dtype is read as fp32.

On CUDA two Triton kernels do it: the first finds the best (value, index) of each ``CHUNK`` of a row,
the second the best chunk; two launches instead of the five of an eager softmax, noise and argmax
(a one-block-per-row argmax alone takes ~27 us for a 128k vocabulary on an H100). Torch elsewhere.
"""

import torch

try:
    import triton
except ImportError:  # CPU-only installs
    triton = None

CHUNK, BLOCK = 2048, 1024

if triton is not None:
    import triton.language as tl

    _NO_INDEX = tl.constexpr(2**31 - 1)  # above any vocabulary index

    @triton.jit
    def _chunk_best_kernel(
        x_ptr,
        q_ptr,
        inv_ptr,
        val_ptr,
        idx_ptr,
        vocab,
        stride_x,
        stride_q,
        num_chunks,
        NOISE: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        inv = 0.0
        if NOISE:
            inv = tl.load(inv_ptr + row)
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


def sample_argmax_ref(logits: torch.Tensor, inv_temp: torch.Tensor | None, q: torch.Tensor | None):
    x = logits.float()
    if q is None:
        return x.argmax(-1)
    noisy = x * inv_temp[:, None] - q.log()
    return torch.where(inv_temp[:, None] == 0, x, noisy).argmax(-1)


def sample_argmax_triton(logits: torch.Tensor, inv_temp: torch.Tensor | None, q: torch.Tensor | None):
    rows, vocab = logits.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    vals = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    noise = q is not None
    _chunk_best_kernel[(rows, num_chunks)](
        logits,
        q if noise else logits,
        inv_temp if noise else logits,
        vals,
        idxs,
        vocab,
        logits.stride(0),
        q.stride(0) if noise else 0,
        num_chunks,
        NOISE=noise,
        CHUNK=CHUNK,
        BLOCK=BLOCK,
        num_warps=4,
    )
    _best_chunk_kernel[(rows,)](vals, idxs, out, num_chunks, CHUNKS_P2=triton.next_power_of_2(num_chunks))
    return out


def sample_argmax(logits: torch.Tensor, inv_temp: torch.Tensor | None = None, q: torch.Tensor | None = None):
    """Token per row of ``logits`` ``[rows, vocab]``; ``inv_temp`` ``[rows]`` and ``q`` ``[rows, vocab]``
    (fp32) together, or neither (greedy). Rows must be contiguous in the last dimension."""
    if (q is None) != (inv_temp is None):
        raise ValueError("sample_argmax needs both inv_temp and q, or neither")
    if logits.is_cuda and triton is not None and logits.stride(-1) == 1 and (q is None or q.stride(-1) == 1):
        return sample_argmax_triton(logits, inv_temp, q)
    return sample_argmax_ref(logits, inv_temp, q)
