"""Fusion: residual add + RMSNorm + per-token fp8 quantization -> ``kiln::add_rms_norm_quant``.

Matches ``h = residual + x`` normalised and quantized for an fp8 projection, with ``h`` used further
(the residual stream), on the post-grad ATen graph, for float32, bfloat16 and float16.
"""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

from kiln.ops.fused_quant import add_rms_norm_quant_ref

_EPS = 1e-6  # placeholder value; the matched graph's own eps is passed through


def _pattern(x, residual, weight, eps):
    return add_rms_norm_quant_ref(x, residual, weight, eps)


def _replacement(x, residual, weight, eps):
    return torch.ops.kiln.add_rms_norm_quant(x, residual, weight, eps)


def build() -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="kiln_fuse_add_rms_norm_quant")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = [
            torch.empty(4, 16, dtype=dtype),
            torch.empty(4, 16, dtype=dtype),
            torch.empty(16, dtype=dtype),
        ]
        register_replacement(_pattern, _replacement, rows, fwd_only, matcher, scalar_workaround={"eps": _EPS})
    return matcher
