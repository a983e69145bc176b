"""Ops that end in per-token fp8 quantization (``kiln.quant.fp8.quantize_per_token``) of their output,
so the row is read once and only its fp8 copy and scale are written:

- ``kiln::rms_norm_quant(x, weight, eps) -> (q, scale)``: RMSNorm, then quantization;
- ``kiln::add_rms_norm_quant(x, residual, weight, eps) -> (q, scale, residual + x)``;
- ``kiln::silu_mul_quant(x) -> (q, scale)``: ``silu(x[:, :d]) * x[:, d:]``, then quantization.

They round exactly where the model's eager code rounds (the norm in fp32, its output in the input dtype,
then the fp8 rounding of ``y / scale``). One Triton program per row on CUDA (``norm_quant_triton``, also
run by the tests under Triton's interpreter), the torch references elsewhere.
"""

import torch
import torch.nn.functional as F

from kiln.quant.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_per_token

try:
    import triton
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    import triton.language as tl

    from kiln.ops.triton_prefill import INTERPRET
    from kiln.ops.triton_store_kv import _round_e4m3

    @triton.jit
    def _norm_quant_kernel(
        x_ptr,
        r_ptr,
        w_ptr,
        q_ptr,
        s_ptr,
        h_ptr,
        stride_x,
        stride_r,
        stride_q,
        stride_h,
        n_cols,
        eps,
        min_scale,
        fp8_max,
        MODE: tl.constexpr,  # 0: rms_norm, 1: add + rms_norm, 2: silu-mul
        ROUND: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if MODE == 2:
            gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
            g = gate.to(tl.float32)
            act = (g * tl.sigmoid(g)).to(up.dtype)
            y = (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
        else:
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            if MODE == 1:
                r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
                x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
                tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
            hf = x.to(tl.float32)
            var = tl.sum(hf * hf, axis=0) / n_cols
            normed = (hf * tl.rsqrt(var + eps)).to(x.dtype)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            y = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        scale = tl.maximum(tl.max(tl.abs(yf), axis=0) / fp8_max, min_scale)
        q = tl.clamp(yf / scale, -fp8_max, fp8_max)
        if ROUND:
            q = _round_e4m3(q)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)


def _rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_quant_ref(x, weight, eps: float):
    return quantize_per_token(_rms_norm(x, weight, eps))


def add_rms_norm_quant_ref(x, residual, weight, eps: float):
    h = residual + x
    q, scale = quantize_per_token(_rms_norm(h, weight, eps))
    return q, scale, h


def silu_mul_quant_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return quantize_per_token(F.silu(gate) * up)


def norm_quant_triton(mode: int, x, residual=None, weight=None, eps: float = 0.0):
    """The kernel for rows of ``x`` (``[T, d]``, or ``[T, 2d]`` for silu-mul): (q, scale[, h])."""
    n_rows = x.shape[0]
    n_cols = x.shape[1] // 2 if mode == 2 else x.shape[1]
    q = torch.empty(n_rows, n_cols, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(n_rows, 1, dtype=torch.float32, device=x.device)
    h = torch.empty_like(x) if mode == 1 else q
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _norm_quant_kernel[(n_rows,)](
            x,
            x if residual is None else residual,
            x if weight is None else weight.contiguous(),
            q,
            scale,
            h,
            x.stride(0),
            x.stride(0) if residual is None else residual.stride(0),
            q.stride(0),
            h.stride(0),
            n_cols,
            eps,
            MIN_SCALE,
            FP8_MAX,
            MODE=mode,
            ROUND=INTERPRET,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return (q, scale, h) if mode == 1 else (q, scale)


def _use_kernel(*tensors) -> bool:
    x = tensors[0]
    return x.is_cuda and triton is not None and x.dim() == 2 and all(t.stride(-1) == 1 for t in tensors)


@torch.library.custom_op("kiln::rms_norm_quant", mutates_args=())
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_kernel(x):
        return norm_quant_triton(0, x, None, weight, eps)
    return rms_norm_quant_ref(x, weight, eps)


@torch.library.custom_op("kiln::add_rms_norm_quant", mutates_args=())
def add_rms_norm_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_kernel(x, residual):
        return norm_quant_triton(1, x, residual, weight, eps)
    return add_rms_norm_quant_ref(x, residual, weight, eps)


@torch.library.custom_op("kiln::silu_mul_quant", mutates_args=())
def silu_mul_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_kernel(x):
        return norm_quant_triton(2, x)
    q, scale = silu_mul_quant_ref(x)
    return q.contiguous(), scale


def _quant_outputs(x, cols):
    return x.new_empty(x.shape[0], cols, dtype=FP8_DTYPE), x.new_empty(x.shape[0], 1, dtype=torch.float32)


@rms_norm_quant.register_fake
def _(x, weight, eps):
    return _quant_outputs(x, x.shape[-1])


@add_rms_norm_quant.register_fake
def _(x, residual, weight, eps):
    return (*_quant_outputs(x, x.shape[-1]), torch.empty_like(x))


@silu_mul_quant.register_fake
def _(x):
    return _quant_outputs(x, x.shape[-1] // 2)
