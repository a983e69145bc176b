"""Fusion: an fp8 projection of a few rows -> ``kiln::fp8_gemv`` (weight-only, small-batch decode).

Matches ``kiln.quant.fp8.fp8_linear`` on the post-grad ATen graph, the activation quantization (dynamic
per token, or the checkpoint's static ``input_scale``) and the product after it (``torch._scaled_mm`` as
on CUDA, or the reference, whose fp32 residual add Inductor turns into ``addmm`` on CPU), with and
without a bias, for float32, bfloat16 and float16 activations, where the input has at most
``fp8_gemv.MAX_ROWS`` rows (a static compile of that size; never a dynamic batch). The replacement
reads the fp8 weight and its per-row scales and leaves the activations in the model dtype: no
quantization kernel, no tensor-core product. The RMSNorm, SiLU-mul and residual add around the
product stay Inductor's.
"""

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fwd_only, register_replacement
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kiln.ops.fp8_gemv import MAX_ROWS  # and registers kiln::fp8_gemv (warm starts load code calling it)
from kiln.quant.fp8 import FP8_DTYPE, quantize_activation, scaled_mm_cuda, scaled_mm_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _example(*shape, dtype=torch.float32):
    """An example input for tracing a pattern, on CUDA where there is one: ``torch._scaled_mm`` with
    row-wise scales runs only there on some torch versions (2.11's CPU kernel takes per-tensor scales).
    Its CUDA kernel wants K and N divisible by 16: the examples use K = 32, N = 16."""
    return torch.empty(*shape, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")


def _patterns(dtype, product):
    """fp8_linear's four forms for one activation dtype and product: (pattern, replacement, arguments)."""

    def dynamic(x, weight, weight_scale):
        return product(*quantize_activation(x, None), weight, weight_scale, dtype)

    def dynamic_fused(x, weight, weight_scale):
        return torch.ops.kiln.fp8_gemv(x, weight, weight_scale, None)

    def dynamic_bias(x, weight, weight_scale, bias):
        return product(*quantize_activation(x, None), weight, weight_scale, dtype, bias)

    def dynamic_bias_fused(x, weight, weight_scale, bias):
        return torch.ops.kiln.fp8_gemv(x, weight, weight_scale, bias)

    def static(x, weight, weight_scale, input_scale):
        return product(*quantize_activation(x, input_scale), weight, weight_scale, dtype)

    def static_fused(x, weight, weight_scale, input_scale):
        return torch.ops.kiln.fp8_gemv(x, weight, weight_scale, None)

    def static_bias(x, weight, weight_scale, input_scale, bias):
        return product(*quantize_activation(x, input_scale), weight, weight_scale, dtype, bias)

    def static_bias_fused(x, weight, weight_scale, input_scale, bias):
        return torch.ops.kiln.fp8_gemv(x, weight, weight_scale, bias)

    x, x1 = _example(2, 32, dtype=dtype), _example(1, 32, dtype=dtype)
    w, ws = _example(16, 32, dtype=FP8_DTYPE), _example(16)
    b, s = _example(16, dtype=dtype), _example(1)
    # the static scale's row-wise copy is none for one row (a [1, 1] expand is contiguous): traced both ways
    return [
        (dynamic, dynamic_fused, [x, w, ws]),
        (dynamic_bias, dynamic_bias_fused, [x, w, ws, b]),
        *((static, static_fused, [rows, w, ws, s]) for rows in (x, x1)),
        *((static_bias, static_bias_fused, [rows, w, ws, s, b]) for rows in (x, x1)),
    ]


def _addmm_patterns():
    """The fp32 reference product followed by the residual add, as the ``addmm`` Inductor makes of it on
    CPU before these passes run: (pattern, replacement, arguments)."""

    def addmm(residual, x, weight, weight_scale, input_scale):
        xq, x_scale = quantize_activation(x, input_scale)
        return torch.addmm(residual, xq.float() * x_scale, (weight.float() * weight_scale[:, None]).t())

    def dynamic(residual, x, weight, weight_scale):
        return addmm(residual, x, weight, weight_scale, None)

    def dynamic_fused(residual, x, weight, weight_scale):
        return residual + torch.ops.kiln.fp8_gemv(x, weight, weight_scale, None)

    def static(residual, x, weight, weight_scale, input_scale):
        return addmm(residual, x, weight, weight_scale, input_scale)

    def static_fused(residual, x, weight, weight_scale, input_scale):
        return residual + torch.ops.kiln.fp8_gemv(x, weight, weight_scale, None)

    w, ws, s = _example(16, 32, dtype=FP8_DTYPE), _example(16), _example(1)
    rows = [(_example(m, 16), _example(m, 32)) for m in (2, 1)]
    return [(dynamic, dynamic_fused, [*rows[0], w, ws])] + [
        (static, static_fused, [r, x, w, ws, s]) for r, x in rows
    ]


def _few_rows(match: Match) -> bool:
    """At most MAX_ROWS rows, statically; an fp8 [N, K] weight with unit column stride; fp32 scales."""
    vals = {
        name: node.meta.get("val") for name, node in match.kwargs.items() if isinstance(node, torch.fx.Node)
    }
    x, weight, scale = vals.get("x"), vals.get("weight"), vals.get("weight_scale")
    if x is None or weight is None or scale is None or x.dim() != 2 or weight.dim() != 2:
        return False
    if weight.dtype != FP8_DTYPE or weight.stride(-1) != 1 or scale.dtype != torch.float32:
        return False
    return statically_known_true(x.shape[0] <= MAX_ROWS)


def build() -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="kiln_fuse_fp8_gemv")
    for dtype in DTYPES:
        for product in (scaled_mm_cuda, scaled_mm_ref):
            for pattern, replacement, args in _patterns(dtype, product):
                register_replacement(pattern, replacement, args, fwd_only, matcher, extra_check=_few_rows)
    for pattern, replacement, args in _addmm_patterns():
        register_replacement(pattern, replacement, args, fwd_only, matcher, extra_check=_few_rows)
    return matcher
