"""``kiln::gemv``: one token's matrix-vector product with its neighbours folded in, for batch-1 decode.

``gemv(x, weight, norm_weight, residual, eps, silu)`` returns ``residual + act(x) @ weight.T`` where
``act`` is RMSNorm with ``norm_weight`` (when given), or ``silu(gate) * up`` over the two halves of
``x`` (when ``silu``), or nothing; ``residual`` is optional. ``x`` has one row. Rounding follows the
model's eager code: the normalised or activated row is rounded to the input dtype before the product,
the product to the input dtype before the residual add.

The Triton kernel gives each program ``BLOCK_N`` rows of ``weight`` and streams them once, so the
weight is read from HBM exactly once; the row of ``x`` (a few KiB) is re-read by every program from L2,
and each program recomputes the RMSNorm statistic itself instead of waiting on another kernel. Block
sizes come from a fixed rule (``triton_gemv.gemv_config``): no tuning at start-up, the same kernels in every
process; ``benchmarks/gemv.py`` times them against cuBLAS. Torch reference elsewhere.
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None  # CPU-only installs lack it


def activation_ref(x, norm_weight, eps: float, silu: bool):
    if silu:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    if norm_weight is not None:
        xf = x.float()
        return norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return x


def gemv_ref(x, weight, norm_weight=None, residual=None, eps: float = 1e-6, silu: bool = False):
    y = F.linear(activation_ref(x, norm_weight, eps, silu), weight)
    return y if residual is None else residual + y


def _check(x, weight, norm_weight, residual, silu):
    n, k = weight.shape
    width = 2 * k if silu else k
    if x.dim() != 2 or tuple(x.shape) != (1, width):
        raise ValueError(f"gemv: x must have shape (1, {width}), got {tuple(x.shape)}")
    if residual is not None and tuple(residual.shape) != (1, n):
        raise ValueError(f"gemv: residual must have shape (1, {n}), got {tuple(residual.shape)}")
    if norm_weight is not None and (silu or tuple(norm_weight.shape) != (k,)):
        raise ValueError(f"gemv: norm_weight must have shape ({k},) and exclude silu")


def gemv_triton(x, weight, norm_weight=None, residual=None, eps: float = 1e-6, silu: bool = False):
    """The Triton kernel (``triton_gemv.py``) on any tensors Triton can address (CPU ones under its
    interpreter)."""
    from kiln.ops.triton_gemv import gemv_triton as run

    return run(x, weight, norm_weight, residual, eps, silu)


@torch.library.custom_op("kiln::gemv", mutates_args=())
def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    _check(x, weight, norm_weight, residual, silu)
    if x.is_cuda and _triton_available():
        return gemv_triton(x, weight, norm_weight, residual, eps, silu)
    return gemv_ref(x, weight, norm_weight, residual, eps, silu)


@gemv.register_fake
def _(x, weight, norm_weight, residual, eps, silu):
    _check(x, weight, norm_weight, residual, silu)
    return x.new_empty(1, weight.shape[0])
