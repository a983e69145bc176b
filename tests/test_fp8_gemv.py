"""``kiln::fp8_gemv`` (weight-only fp8 products of a few rows) and the ``fuse_fp8_gemv`` pass that puts it
into static compiles of at most ``MAX_ROWS`` rows.

The kernel runs in Triton's interpreter on CPU (tests/conftest.py) and for real on a GPU; the op falls
back to the torch reference (dequantize, then an fp32 product) off CUDA, so the pass and the end-to-end
check run anywhere.
"""

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_greedy_agrees
from static_decode import assert_same_greedy, static_and_eager
from test_pass_fusion import _ops, aten_graph

import kiln.quant.linear
from kiln.compiler.config import PassConfig
from kiln.compiler.passes import fusion_fp8_gemv
from kiln.ops.fp8_gemv import MAX_ROWS, fp8_gemv_ref, fp8_gemv_triton
from kiln.quant.fp8 import fp8_linear, quantize_per_channel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_matcher = functools.cache(fusion_fp8_gemv.build)  # one build for the module's graphs


def _operands(m, n, k, dtype, device, bias=False, per_tensor=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    if per_tensor:  # a per-tensor checkpoint scale, spread over the rows as kiln loads it
        scale = (w.abs().amax() / 448).reshape(1).expand(n).clone()
        wq = (w / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        wq, scale = quantize_per_channel(w)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, wq.to(device), scale.to(device), b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k", [(1, 24, 40), (1, 64, 2048), (3, 5, 3000), (MAX_ROWS, 40, 4100)])
@pytest.mark.parametrize("bias, per_tensor", [(False, False), (True, False), (False, True)])
def test_kernel_matches_reference(dtype, m, n, k, bias, per_tensor):
    """Ragged and power-of-two shapes, several K steps and row blocks, 1 to MAX_ROWS activation rows."""
    x, w, s, b = _operands(m, n, k, dtype, DEV, bias, per_tensor)
    got = fp8_gemv_triton(x, w, s, b)
    want = fp8_gemv_ref(x, w, s, b)
    assert got.shape == (m, n) and got.dtype == dtype
    # fp32: the kernel scales the sum, the reference each weight (and sums in another order); 16-bit:
    # one rounding of the output, at most an ulp apart
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)


def test_reference_is_the_dequantized_product():
    x, w, s, b = _operands(2, 16, 32, torch.float64, "cpu", bias=True)
    x = x.float()
    exact = x.double() @ (w.double() * s.double()[:, None]).t() + b.double()
    torch.testing.assert_close(fp8_gemv_ref(x, w, s, b.float()).double(), exact, atol=1e-5, rtol=1e-5)


# real llama-1b projection shapes: qkv, o, gate/up, down (N, K)
LLAMA_1B = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, MAX_ROWS])
def test_kernel_real_shapes_on_gpu(m):
    for n, k in LLAMA_1B:
        x, w, s, b = _operands(m, n, k, torch.bfloat16, "cuda")
        got = torch.ops.kiln.fp8_gemv(x, w, s, None)
        torch.testing.assert_close(got, fp8_gemv_ref(x, w, s), atol=6e-2, rtol=2e-2)
        # the W8A8 path differs by its activation quantization only: 2.7% relative on these operands with
        # the reference product (CPU), none at all would mean the GEMV quantizes too
        w8a8 = fp8_linear(x, w, s)
        assert 0.01 < (got.float() - w8a8.float()).norm() / w8a8.float().norm() < 0.05


def test_op_rejects_bad_inputs():
    x, w, s, _ = _operands(1, 8, 16, torch.float32, "cpu")
    cases = [
        ((torch.zeros(MAX_ROWS + 1, 16), w, s, None), "x must have shape"),
        ((torch.zeros(1, 15), w, s, None), "x must have shape"),
        ((x, w.float(), s, None), "weight must be a 2-D float8_e4m3fn"),
        ((x, w, s[:4], None), "weight_scale must be float32 of shape"),
        ((x, w, s.double(), None), "weight_scale must be float32"),
        ((x, w, s, torch.zeros(9)), "bias must have shape"),
        ((x.to(torch.int32), w, s, None), "x must be float32, bfloat16 or float16"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            torch.ops.kiln.fp8_gemv(*args)


def _linear_args(rows, dtype, bias, static):
    x, w, s, b = _operands(rows, 48, 32, dtype, "cpu", bias)
    return x, w, s, (torch.tensor([0.02]) if static else None), b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_scaled_mm", [False, True])
@pytest.mark.parametrize("bias, static", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("rows, matches", [(1, 1), (MAX_ROWS + 1, 0)])
def test_pass_replaces_few_row_fp8_products(dtype, use_scaled_mm, bias, static, rows, matches):
    """Each form of fp8_linear (torch._scaled_mm as on CUDA or the reference; dynamic or static activation
    scales; with a bias or not) of at most MAX_ROWS rows becomes one kiln::fp8_gemv, nothing else left."""
    x, w, s, input_scale, b = _linear_args(rows, dtype, bias, static)

    def fn(x, w, s, b=None, input_scale=None):
        return fp8_linear(x, w, s, input_scale, b, use_scaled_mm=use_scaled_mm)

    args = [x, w, s, b, input_scale]
    gm = aten_graph(fn, args)
    assert _matcher().apply(gm.graph) == matches
    gm.graph.eliminate_dead_code()
    gm.recompile()
    ops = _ops(gm)
    assert ops.count("kiln.fp8_gemv.default") == matches
    if matches:  # the activation quantization and the product are gone
        assert not any(op.startswith(("aten.amax", "aten._scaled_mm", "aten.mm", "aten.addmm")) for op in ops)
        torch.testing.assert_close(gm(*args), fp8_gemv_ref(x, w, s, b), atol=0, rtol=0)
    else:
        torch.testing.assert_close(gm(*args), fn(*args), atol=0, rtol=0)


def test_pass_takes_up_to_max_rows():
    x, w, s, _, _ = _linear_args(MAX_ROWS, torch.bfloat16, False, False)
    gm = aten_graph(lambda x, w, s: fp8_linear(x, w, s, use_scaled_mm=True), [x, w, s])
    assert _matcher().apply(gm.graph) == 1


def test_pass_leaves_bf16_products_alone():
    gm = aten_graph(lambda x, w: F.linear(x, w), [torch.randn(1, 32), torch.randn(8, 32)])
    assert _matcher().apply(gm.graph) == 0


def test_fp8_gemv_runs_before_the_other_gemv_and_the_quant_fusions():
    config = PassConfig(fuse_fp8_gemv=True, fuse_rms_norm_quant=True, fuse_gemv=True)
    assert config.enabled_fusions() == ["fuse_fp8_gemv", "fuse_gemv", "fuse_rms_norm_quant"]


def _weight_only_for_one_row(x, weight, weight_scale, input_scale=None, bias=None):
    """The eager oracle of the static size-1 compile with fuse_fp8_gemv: one row through the weight-only
    reference, every other batch as before."""
    if x.dim() == 2 and x.shape[0] == 1:
        return fp8_gemv_ref(x, weight, weight_scale, bias)
    return fp8_linear(x, weight, weight_scale, input_scale, bias)


@contextlib.contextmanager
def _weight_only_eager(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(kiln.quant.linear, "fp8_linear", _weight_only_for_one_row)
        yield


def _static_fp8_gemv_and_eager(ckpt, cache_dir, monkeypatch, dtype):
    """Greedy batch-1 decode (got, want): the static size-1 compile with fuse_fp8_gemv, and eager with
    the weight-only reference for one-row products; checks every fp8 projection became the GEMV.
    20 logprobs: a tiny random model's bf16 distribution is flat, a flipped near-tie may pick the 3rd."""
    eager = _weight_only_eager(monkeypatch)
    engine = dict(logprobs=20, dtype=dtype, quantization="fp8")
    got, want, report = static_and_eager(ckpt, cache_dir, "fuse_fp8_gemv", eager, **engine)
    # 2 layers of 4 fp8 projections (qkv, o, gate/up, down)
    assert report.static_compiles == 3 and report.pattern_matches["fuse_fp8_gemv"] == 8
    return got, want


def test_static_size_one_compile_uses_fp8_gemv_and_matches_eager(tiny_checkpoint, tmp_path, monkeypatch):
    """fp32 activations: greedy tokens of a batch-1 decode through the fused static compile equal the
    eager weight-only reference's (the op runs that reference on CPU)."""
    got, want = _static_fp8_gemv_and_eager(tiny_checkpoint("llama"), str(tmp_path), monkeypatch, "float32")
    assert_same_greedy(got, want, 1e-4)


@pytest.mark.gpu
def test_static_fp8_gemv_in_cuda_graphs_matches_eager(tiny_checkpoint, tmp_path, monkeypatch):
    """On the GPU: the Triton kernel inside the CUDA graph of the one-token step. fp32: the same greedy
    tokens as the reference; bf16: the prompt's W8A8 products run under Inductor's bf16 fusions on one
    side and eagerly on the other, and one flipped fp8 rounding of an activation moves a logprob by more
    than 5e-2, so bf16 uses the tolerance of the other bf16 fp8 comparisons (test_quant_fp8, 0.3)."""
    ckpt = tiny_checkpoint("llama")
    got, want = _static_fp8_gemv_and_eager(ckpt, str(tmp_path / "fp32"), monkeypatch, "float32")
    assert_same_greedy(got, want, 1e-3)
    got, want = _static_fp8_gemv_and_eager(ckpt, str(tmp_path / "bf16"), monkeypatch, "bfloat16")
    assert_greedy_agrees(want, got, tol=0.3)
