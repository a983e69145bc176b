"""Fusion: ``silu(gate) * up`` over the halves of the gate/up projection -> ``kiln::silu_and_mul``."""

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

import kiln.ops.fused_silu_mul  # noqa: F401  (registers kiln::silu_and_mul)


def _pattern(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _replacement(x):
    return torch.ops.kiln.silu_and_mul(x)


def build() -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="kiln_fuse_silu_mul")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        register_replacement(_pattern, _replacement, [torch.empty(4, 32, dtype=dtype)], fwd_only, matcher)
    return matcher
