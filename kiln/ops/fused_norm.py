"""``kiln::fused_add_rms_norm``: residual add + RMSNorm in one pass over the row.

``(x, residual, weight, eps) -> (weight * rms_norm(residual + x), residual + x)``, rounding exactly
where the model's eager code rounds (the sum in the input dtype, the norm in fp32, the normalised
row back to the input dtype before the weight multiply). Triton kernel on CUDA, torch elsewhere.
"""

import torch

try:
    import triton
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,
        r_ptr,
        w_ptr,
        out_ptr,
        h_ptr,
        stride_x,
        stride_r,
        stride_o,
        stride_h,
        n_cols,
        eps,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / n_cols
        y = (hf * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def fused_add_rms_norm_ref(x, residual, weight, eps: float):
    h = residual + x
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h


@torch.library.custom_op("kiln::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not (x.is_cuda and triton is not None)
        or x.dim() != 2
        or x.stride(-1) != 1
        or residual.stride(-1) != 1
    ):
        out, h = fused_add_rms_norm_ref(x, residual, weight, eps)
        return out, h
    out, h = torch.empty_like(x), torch.empty_like(x)
    n_rows, n_cols = x.shape
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _add_rms_norm_kernel[(n_rows,)](
            x,
            residual,
            weight.contiguous(),
            out,
            h,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            h.stride(0),
            n_cols,
            eps,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out, h


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)
