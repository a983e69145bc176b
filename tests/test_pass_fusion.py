"""Fusion passes on small ATen graphs, and the fused ops against their torch references."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from kiln.compiler.passes import fusion_add_rms_norm, fusion_silu_mul
from kiln.compiler.passes.fusion import FusionPasses
from kiln.ops.fused_norm import fused_add_rms_norm_ref
from kiln.ops.fused_silu_mul import silu_and_mul_ref

DTYPES = [torch.float32, torch.bfloat16]


def _rms(h, w, eps):
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def block(x, residual, w_norm, w_up):
    """A decoder-layer fragment: residual add + RMSNorm, gate/up projection, SiLU-and-mul."""
    h = residual + x
    y = _rms(h, w_norm, 1e-5)
    gate, up = (y @ w_up).chunk(2, dim=-1)
    return F.silu(gate) * up, h


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(6, 32, generator=g).to(dtype),
        torch.randn(6, 32, generator=g).to(dtype),
        torch.rand(32, generator=g).to(dtype) + 0.5,
        torch.randn(32, 64, generator=g).to(dtype) * 0.2,
    ]


def aten_graph(fn, args):
    """``fn`` traced to ATen with Inductor's decompositions, metadata from one fake mode (as post-grad)."""
    return make_fx(fn, select_decomp_table(), tracing_mode="fake")(*args)


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "module, op", [(fusion_add_rms_norm, "kiln.fused_add_rms_norm"), (fusion_silu_mul, "kiln.silu_and_mul")]
)
def test_pass_replaces_pattern(module, op, dtype):
    args = _inputs(dtype)
    gm = aten_graph(block, args)
    expected = block(*args)
    assert module.build().apply(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert sum(op in t for t in _ops(gm)) == 1
    for got, want in zip(gm(*args), expected):
        torch.testing.assert_close(got, want)


def test_norm_without_residual_add_is_left_alone():
    def plain(x, w):
        return _rms(x, w, 1e-6)

    gm = aten_graph(plain, [torch.randn(4, 32), torch.rand(32)])
    assert fusion_add_rms_norm.build().apply(gm.graph) == 0


def test_runner_counts_and_uuid():
    counts = {}
    passes = FusionPasses(["fuse_add_rms_norm", "fuse_silu_mul"], counts)
    gm = aten_graph(block, _inputs(torch.float32))
    passes.inductor_pass()(gm.graph)
    assert counts == {"fuse_add_rms_norm": 1, "fuse_silu_mul": 1}
    assert passes.uuid != FusionPasses(["fuse_silu_mul"], {}).uuid
    assert FusionPasses([], {}).inductor_pass() is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_fused_ops_match_references(device, dtype):
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(37, 160, generator=g).to(dtype).to(device) for _ in range(2))
    w = (torch.rand(160, generator=g) + 0.5).to(dtype).to(device)
    out, h = torch.ops.kiln.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_h = fused_add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
    tol = 0 if device == "cpu" else 2e-2
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    gu = torch.randn(37, 2 * 300, generator=g).to(dtype).to(device)
    torch.testing.assert_close(torch.ops.kiln.silu_and_mul(gu), silu_and_mul_ref(gu), rtol=tol, atol=tol)
    empty = torch.empty(0, 160, dtype=dtype, device=device)
    assert torch.ops.kiln.fused_add_rms_norm(empty, empty, w, 1e-6)[0].shape == (0, 160)
