"""The fp8 quantization fusions on small ATen graphs of fp8 decoder fragments, and their fused ops (the
Triton kernel under Triton's interpreter) against the torch references."""

import pytest
import torch
import torch.nn.functional as F
from test_pass_fusion import _ops, _rms, aten_graph

from kiln.compiler.config import PassConfig
from kiln.compiler.passes import (
    fusion_add_rms_norm,
    fusion_add_rms_norm_quant,
    fusion_rms_norm_quant,
    fusion_silu_mul_quant,
)
from kiln.compiler.passes.fusion import FusionPasses
from kiln.ops.fused_quant import (
    add_rms_norm_quant_ref,
    norm_quant_triton,
    rms_norm_quant_ref,
    silu_mul_quant_ref,
)
from kiln.quant.fp8 import fp8_linear, quantize_per_channel

DTYPES = [torch.float32, torch.bfloat16]


def fp8_layer(x, residual, w_norm, w_gu, s_gu, w_down, s_down):
    """Residual add + RMSNorm, fp8 gate/up projection, SiLU-mul, fp8 down projection (reference product)."""
    h = residual + x
    gate, up = fp8_linear(_rms(h, w_norm, 1e-5), w_gu, s_gu, use_scaled_mm=False).chunk(2, dim=-1)
    return fp8_linear(F.silu(gate) * up, w_down, s_down, use_scaled_mm=False), h


def first_layer(x, w_norm, w_gu, s_gu):
    """A norm without a residual add in front, then an fp8 projection."""
    return fp8_linear(_rms(x, w_norm, 1e-5), w_gu, s_gu, use_scaled_mm=False)


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    w_gu, s_gu = quantize_per_channel(torch.randn(64, 32, generator=g) * 0.2)
    w_down, s_down = quantize_per_channel(torch.randn(32, 32, generator=g) * 0.2)
    x, r = (torch.randn(6, 32, generator=g).to(dtype) for _ in range(2))
    return [x, r, (torch.rand(32, generator=g) + 0.5).to(dtype), w_gu, s_gu, w_down, s_down]


def _check(fn, args, passes):
    gm = aten_graph(fn, args)
    expected = fn(*args)
    counts = {}
    FusionPasses(passes, counts).inductor_pass()(gm.graph)
    gm.recompile()
    got = gm(*args)
    for a, b in zip(
        got if isinstance(got, tuple) else [got], expected if isinstance(got, tuple) else [expected]
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return counts, _ops(gm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_fusions_replace_both_quantizations(dtype):
    counts, ops = _check(fp8_layer, _inputs(dtype), ["fuse_add_rms_norm_quant", "fuse_silu_mul_quant"])
    assert counts == {"fuse_add_rms_norm_quant": 1, "fuse_silu_mul_quant": 1}
    assert sum("kiln.add_rms_norm_quant" in t for t in ops) == 1
    assert sum("kiln.silu_mul_quant" in t for t in ops) == 1
    assert not any("amax" in t for t in ops)  # no activation quantization left outside the fused ops


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_quant_fusion(dtype):
    x, _, w, w_gu, s_gu, *_ = _inputs(dtype)
    counts, ops = _check(first_layer, [x, w, w_gu, s_gu], ["fuse_rms_norm_quant"])
    assert counts == {"fuse_rms_norm_quant": 1} and sum("kiln.rms_norm_quant" in t for t in ops) == 1


def test_quant_fusions_run_before_the_plain_ones():
    """With fuse_add_rms_norm on too, the quantizing variant takes the norm that feeds an fp8 projection."""
    config = PassConfig(fuse_add_rms_norm=True, fuse_add_rms_norm_quant=True)
    assert config.enabled_fusions() == ["fuse_add_rms_norm_quant", "fuse_add_rms_norm"]
    counts, _ = _check(fp8_layer, _inputs(torch.float32), config.enabled_fusions())
    assert counts == {"fuse_add_rms_norm_quant": 1, "fuse_add_rms_norm": 0}
    assert fusion_add_rms_norm.build() is not None


def test_norm_quant_passes_leave_unquantized_norms_alone():
    def plain(x, residual, w):
        h = residual + x
        return _rms(h, w, 1e-6), h

    gm = aten_graph(plain, [torch.randn(4, 32), torch.randn(4, 32), torch.rand(32)])
    for module in (fusion_add_rms_norm_quant, fusion_rms_norm_quant, fusion_silu_mul_quant):
        assert module.build().apply(gm.graph) == 0


# Triton's interpreter narrows fp32 to 16-bit floats without carrying a rounded-up mantissa, so the 16-bit
# cases run on a GPU only
KERNEL_CASES = [("cpu", torch.float32)] + [
    pytest.param("cuda", dtype, marks=pytest.mark.gpu)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("device,dtype", KERNEL_CASES)
def test_fused_quant_kernel_matches_references(device, dtype):
    g = torch.Generator().manual_seed(2)
    x, r = ((torch.randn(9, 4096, generator=g) * 3).to(dtype).to(device) for _ in range(2))
    w = (torch.rand(4096, generator=g) + 0.5).to(dtype).to(device)
    x[3] = 0  # an all-zero row (silu-mul of zeros too)
    xr = torch.cat([x, r], 1)
    cases = [
        (norm_quant_triton(0, x, None, w, 1e-6), rms_norm_quant_ref(x, w, 1e-6)),
        (norm_quant_triton(1, x, r, w, 1e-6), add_rms_norm_quant_ref(x, r, w, 1e-6)),
        (norm_quant_triton(2, xr), silu_mul_quant_ref(xr)),
    ]
    for got, ref in cases:
        (q, scale, *h), (q_ref, scale_ref, *h_ref) = got, ref
        for a, b in zip(h, h_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if device == "cpu":
            torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
            assert torch.equal(q.float(), q_ref.float())
        else:  # the GPU's fp32 division and rsqrt are approximate: a few values one fp8 step apart
            torch.testing.assert_close(scale, scale_ref, rtol=2e-2, atol=0)
            step = q_ref.float().abs().clamp_min(2**-6) * 2**-3
            assert ((q.float() - q_ref.float()).abs() <= step + 1e-9).all()
            assert (q.float() != q_ref.float()).float().mean() < 0.01
