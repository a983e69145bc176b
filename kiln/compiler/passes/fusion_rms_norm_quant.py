"""Fusion: RMSNorm + per-token fp8 quantization of its output -> ``kiln::rms_norm_quant``.

Matches an fp8 projection's input quantization (``kiln.quant.fp8.quantize_per_token``) applied to the
model's ``weight * rms_norm(x)`` (the first layer's input norm, or any norm without a residual add in
front), on the post-grad ATen graph, for float32, bfloat16 and float16.
"""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

from kiln.ops.fused_quant import rms_norm_quant_ref

_EPS = 1e-6  # placeholder value; the matched graph's own eps is passed through


def _pattern(x, weight, eps):
    return rms_norm_quant_ref(x, weight, eps)


def _replacement(x, weight, eps):
    return torch.ops.kiln.rms_norm_quant(x, weight, eps)


def build() -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="kiln_fuse_rms_norm_quant")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = [torch.empty(4, 16, dtype=dtype), torch.empty(16, dtype=dtype)]
        register_replacement(_pattern, _replacement, rows, fwd_only, matcher, scalar_workaround={"eps": _EPS})
    return matcher
