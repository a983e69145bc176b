"""Triton kernel of ``kiln::fp8_gemv`` (``kiln/ops/fp8_gemv.py``), imported on the first CUDA call so that
``import kiln`` does not import Triton."""

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # M rounded up to a power of two: every activation row in one program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    ms = tl.arange(0, ROWS)
    m_mask = ms < M
    cols0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + cols0
        col_mask = cols < K
        x_mask = m_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + ms[:, None] * stride_xm + cols[None, :], mask=x_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)  # the weight tile read once for all rows
    y = acc * tl.load(s_ptr + rows, mask=row_mask, other=0.0)[None, :]
    if BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + ms[:, None] * stride_om + rows[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


def fp8_gemv_config(n: int, k: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): 4 warps, 4 weight rows, and 8192 elements of the (rows x weight
    rows x K) product per step of the K loop, i.e. 8192 weight bytes at one activation row (the bf16
    GEMV's 8192 elements per step, ``triton_gemv.gemv_config``) and a shorter K step for more rows, so
    the registers per thread stay those of one row. ``benchmarks/fp8_gemv.py --sweep`` times the
    alternatives."""
    return 4, min(2048 // triton.next_power_of_2(m), triton.next_power_of_2(k)), 4


def fp8_gemv_triton(x, weight, weight_scale, bias=None, config=None):
    """The Triton kernel on any tensors Triton can address (CPU ones under its interpreter); ``config``
    overrides ``fp8_gemv_config`` (the benchmark's sweep)."""
    n, k = weight.shape
    m = x.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or fp8_gemv_config(n, k, m)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        weight_scale.contiguous(),
        bias.contiguous() if bias is not None else out,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BIAS=bias is not None,
        ROWS=triton.next_power_of_2(m),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out
