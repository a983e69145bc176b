"""Fusion: one-token matrix products with their neighbours -> ``kiln::gemv`` (batch-1 decode).

Matches, where the product's input has exactly one row (a static compile of size 1), the decoder
layer's four products with what surrounds them:
- RMSNorm then a product (qkv, gate/up): the kernel normalises its row itself;
- SiLU-mul then a product then the residual add (down): the kernel applies the activation itself;
- a product then the residual add (o): the kernel adds the residual.
The residual add is matched as written and as the ``addmm`` Inductor makes of it on some platforms.
Each becomes one kernel whose block sizes are fixed by rule, so these products do not depend on
Inductor's tuning at start-up. Patterns are registered for float32, bfloat16 and float16.
"""

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fwd_only, register_replacement
from torch.fx.experimental.symbolic_shapes import statically_known_true

import kiln.ops.gemv  # noqa: F401  (registers kiln::gemv)

_EPS = 1e-6  # placeholder value; the matched graph's own eps is passed through


def _silu_linear_residual(x, weight, residual):
    gate, up = x.chunk(2, dim=-1)
    return residual + F.linear(F.silu(gate) * up, weight)


def _silu_addmm(x, weight, residual):  # Inductor turns ``residual + mm`` into addmm on some platforms
    gate, up = x.chunk(2, dim=-1)
    return torch.addmm(residual, F.silu(gate) * up, weight.t())


def _silu_linear_residual_fused(x, weight, residual):
    return torch.ops.kiln.gemv(x, weight, None, residual, 0.0, True)


def _linear_residual(x, weight, residual):
    return residual + F.linear(x, weight)


def _addmm(x, weight, residual):
    return torch.addmm(residual, x, weight.t())


def _linear_residual_fused(x, weight, residual):
    return torch.ops.kiln.gemv(x, weight, None, residual, 0.0, False)


def _norm_linear(x, norm_weight, weight, eps):
    xf = x.float()
    return F.linear(
        norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), weight
    )


def _norm_linear_fused(x, norm_weight, weight, eps):
    return torch.ops.kiln.gemv(x, weight, norm_weight, None, eps, False)


def _one_row(match: Match) -> bool:
    """The product's input is a single row (never true of a dynamic batch), the residual is a row too
    (not a broadcast bias), and everything has one dtype."""
    vals = {
        name: node.meta.get("val") for name, node in match.kwargs.items() if isinstance(node, torch.fx.Node)
    }
    x, weight, residual = vals.get("x"), vals.get("weight"), vals.get("residual")
    if x is None or weight is None or x.dim() != 2 or weight.dim() != 2 or weight.stride(-1) != 1:
        return False
    if residual is not None and (residual.dim() != 2 or not statically_known_true(residual.shape[0] == 1)):
        return False
    dtypes = {v.dtype for v in vals.values() if isinstance(v, torch.Tensor)}
    return statically_known_true(x.shape[0] == 1) and len(dtypes) == 1


def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)


def build() -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="kiln_fuse_gemv")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    # patterns are tried in registration order: every SiLU-mul form before the plain residual-add forms,
    # which are its tail (traced with two rows: single-row products decompose differently on CPU)
    for dtype in dtypes:
        for pattern in (_silu_linear_residual, _silu_addmm):
            register_replacement(
                pattern,
                _silu_linear_residual_fused,
                [_t(2, 32, dtype=dtype), _t(8, 16, dtype=dtype), _t(2, 8, dtype=dtype)],
                fwd_only,
                matcher,
                extra_check=_one_row,
            )
    for pattern in (_linear_residual, _addmm):  # no casts in them: one pattern serves every dtype
        register_replacement(
            pattern,
            _linear_residual_fused,
            [_t(2, 16), _t(8, 16), _t(2, 8)],
            fwd_only,
            matcher,
            extra_check=_one_row,
        )
    for dtype in dtypes:
        register_replacement(
            _norm_linear,
            _norm_linear_fused,
            [_t(2, 16, dtype=dtype), _t(16, dtype=dtype), _t(8, 16, dtype=dtype)],
            fwd_only,
            matcher,
            extra_check=_one_row,
            scalar_workaround={"eps": _EPS},
        )
    return matcher
