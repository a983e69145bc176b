"""Fusion: residual add + RMSNorm -> ``kiln::fused_add_rms_norm`` (one read of both rows, one kernel).

Matches the model's ``h = residual + x; weight * rms_norm(h)`` where both ``h`` and the normalised
output are used, on the post-grad ATen graph, for float32, bfloat16 and float16 (the casts differ).
"""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

import kiln.ops.fused_norm  # noqa: F401  (registers kiln::fused_add_rms_norm)

_EPS = 1e-6  # placeholder value; the matched graph's own eps is passed through


def _pattern(x, residual, weight, eps):
    h = residual + x
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h


def _replacement(x, residual, weight, eps):
    out, h = torch.ops.kiln.fused_add_rms_norm(x, residual, weight, eps)
    return out, h


def build() -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="kiln_fuse_add_rms_norm")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = [
            torch.empty(4, 16, dtype=dtype),
            torch.empty(4, 16, dtype=dtype),
            torch.empty(16, dtype=dtype),
        ]
        register_replacement(_pattern, _replacement, rows, fwd_only, matcher, scalar_workaround={"eps": _EPS})
    return matcher
