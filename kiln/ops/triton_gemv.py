"""Triton kernel of ``kiln::gemv`` (``kiln/ops/gemv.py``), imported on the first CUDA call so that
``import kiln`` does not import Triton."""

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    r_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    eps,
    NORM: tl.constexpr,
    SILU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols0 = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    if NORM:
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            cols = k + cols0
            xk = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            squares += xk * xk
        inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + cols0
        col_mask = cols < K
        if SILU:
            gate = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + cols, mask=col_mask, other=0.0).to(tl.float32)
            act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            xk = (act * up).to(dtype).to(tl.float32)
        elif NORM:
            xk = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            xk = (g * (xk * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        else:
            xk = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc += w.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1).to(dtype)
    if RESIDUAL:
        r = tl.load(r_ptr + rows, mask=row_mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows, y, mask=row_mask)


def gemv_config(n: int, k: int, prologue: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an ``n x k`` weight; ``prologue``: RMSNorm or SiLU-mul on the
    input. From ``benchmarks/gemv.py --sweep`` on the H100 (results/gemv_sweep_llama-{1b,8b}_h100.json):
    4 warps and 8192 weight elements per step of the K loop; (4, 2048) was best or within 2% of it for
    every product with a prologue, (2, 1024) likewise for the plain one (the o projection)."""
    block_n, block_k = (4, 2048) if prologue else (2, 1024)
    return block_n, min(block_k, triton.next_power_of_2(k)), 4


def gemv_triton(x, weight, norm_weight=None, residual=None, eps: float = 1e-6, silu: bool = False):
    """The Triton kernel on any tensors Triton can address (CPU ones under its interpreter)."""
    n, k = weight.shape
    x = x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = gemv_config(n, k, silu or norm_weight is not None)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        norm_weight if norm_weight is not None else x,
        residual.contiguous() if residual is not None else out,
        out,
        n,
        k,
        weight.stride(0),
        eps,
        NORM=norm_weight is not None,
        SILU=silu,
        RESIDUAL=residual is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out
