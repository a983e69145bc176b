"""``kiln::fp8_gemv``: a few rows of activations times an fp8 weight, for small-batch decode.

``fp8_gemv(x, weight, weight_scale, bias)`` returns ``x @ (weight * weight_scale[:, None]).T (+ bias)``
in ``x``'s dtype: ``x`` is ``[M, K]`` in fp32, bf16 or fp16 with ``M <= MAX_ROWS``, ``weight`` float8_e4m3fn
``[N, K]``, ``weight_scale`` fp32 ``[N]`` (kiln's layout: one scale per output row, a per-tensor scale
repeated over the rows, see ``kiln/quant/linear.py``), ``bias`` ``[N]`` or None. Weight-only: the
activations are not quantized, unlike ``fp8_linear``'s ``torch._scaled_mm`` path, whose per-token
quantization and tensor-core product cost more than the halved weight read saves at one row.

The Triton kernel (``triton_fp8_gemv.py``) streams each fp8 weight tile once for all the activation rows,
widens it to fp32 in registers and accumulates in fp32; the scale and bias are applied once per output. Torch
reference (dequantize the weight to fp32, then an fp32 product) off CUDA and as the tests' oracle.
``kiln/compiler/passes/fusion_fp8_gemv.py`` puts it in static compiles of at most ``MAX_ROWS`` rows.
"""

import functools
import importlib.util

import torch

from kiln.quant.fp8 import FP8_DTYPE

# rows of x the kernel takes, all in each program (H200, one program per activation row and weight block,
# relying on L2 for the rows after the first: 4 rows took 2.2-3.2x the time of one)
MAX_ROWS = 4


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None  # CPU-only installs lack it


def fp8_gemv_ref(x, weight, weight_scale, bias=None):
    """Dequantize the weight to fp32, multiply in fp32, add the bias in fp32, round to ``x.dtype``."""
    out = x.float() @ (weight.float() * weight_scale.float()[:, None]).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def check_fp8_gemv(x, weight, weight_scale, bias) -> None:
    if weight.dim() != 2 or weight.dtype != FP8_DTYPE:
        raise ValueError(
            f"fp8_gemv: weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(
            f"fp8_gemv: x must have shape (M, {k}) with 1 <= M <= {MAX_ROWS}, got {tuple(x.shape)}"
        )
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_gemv: x must be float32, bfloat16 or float16, got {x.dtype}")
    if tuple(weight_scale.shape) != (n,) or weight_scale.dtype != torch.float32:
        raise ValueError(
            f"fp8_gemv: weight_scale must be float32 of shape ({n},), got {weight_scale.dtype} "
            f"{tuple(weight_scale.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_gemv: bias must have shape ({n},), got {tuple(bias.shape)}")


def fp8_gemv_triton(x, weight, weight_scale, bias=None):
    """The Triton kernel on any tensors Triton can address (CPU ones under its interpreter)."""
    from kiln.ops.triton_fp8_gemv import fp8_gemv_triton as run

    return run(x, weight, weight_scale, bias)


@torch.library.custom_op("kiln::fp8_gemv", mutates_args=())
def fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    check_fp8_gemv(x, weight, weight_scale, bias)
    if x.is_cuda and _triton_available():
        return fp8_gemv_triton(x, weight, weight_scale, bias)
    return fp8_gemv_ref(x, weight, weight_scale, bias)


@fp8_gemv.register_fake
def _(x, weight, weight_scale, bias):
    check_fp8_gemv(x, weight, weight_scale, bias)
    return x.new_empty(x.shape[0], weight.shape[0])
