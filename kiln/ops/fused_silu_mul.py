"""``kiln::silu_and_mul``: ``silu(x[:, :d]) * x[:, d:]`` for the gate/up projection output ``[T, 2d]``,
rounding like the eager code (silu to the input dtype, then the product). Triton on CUDA."""

import torch
import torch.nn.functional as F

try:
    import triton
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
        act = (gate * tl.sigmoid(gate)).to(up.dtype)
        tl.store(
            out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=mask
        )


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@torch.library.custom_op("kiln::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if not (x.is_cuda and triton is not None) or x.dim() != 2 or x.stride(-1) != 1:
        return silu_and_mul_ref(x).contiguous()
    n_rows, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(n_rows, d, dtype=x.dtype, device=x.device)
    if n_rows:
        block = 1024
        _silu_and_mul_kernel[(n_rows, triton.cdiv(d, block))](
            x, out, x.stride(0), out.stride(0), d, BLOCK=block
        )
    return out


@silu_and_mul.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
