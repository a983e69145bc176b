"""Fusion: ``silu(gate) * up`` + per-token fp8 quantization (the down projection's input) ->
``kiln::silu_mul_quant``, on the post-grad ATen graph, for float32, bfloat16 and float16."""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

from kiln.ops.fused_quant import silu_mul_quant_ref


def _pattern(x):
    return silu_mul_quant_ref(x)


def _replacement(x):
    return torch.ops.kiln.silu_mul_quant(x)


def build() -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="kiln_fuse_silu_mul_quant")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        register_replacement(_pattern, _replacement, [torch.empty(4, 32, dtype=dtype)], fwd_only, matcher)
    return matcher
