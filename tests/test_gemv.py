"""``kiln::gemv`` (one-token products with RMSNorm / SiLU-mul / residual add folded in) and the
``fuse_gemv`` pass that puts it into static compiles of size 1.

The kernel runs in Triton's interpreter on CPU (tests/conftest.py) and for real on a GPU; the op
falls back to the torch reference off CUDA, so the pass and the end-to-end check run anywhere.
"""

import pytest
import torch
import torch.nn.functional as F
from static_decode import assert_same_greedy, static_and_eager
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from kiln.compiler.passes import fusion_gemv
from kiln.ops.gemv import gemv_ref, gemv_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ["plain", "norm", "residual", "silu"]


def _operands(kind, n, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = r(1, 2 * k if kind == "silu" else k)
    norm_weight = r(k, scale=0.1) + 1 if kind == "norm" else None
    residual = r(1, n) if kind in ("residual", "silu") else None
    return x, r(n, k, scale=k**-0.5), norm_weight, residual, kind == "silu"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(24, 40), (64, 2048), (5, 3000)])
def test_kernel_matches_reference(kind, dtype, n, k):
    """Ragged and power-of-two shapes; several K blocks and several row blocks."""
    x, w, g, r, silu = _operands(kind, n, k, dtype, DEV)
    got = gemv_triton(x, w, g, r, 1e-5, silu)
    want = gemv_ref(x, w, g, r, 1e-5, silu)
    assert got.shape == (1, n) and got.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_real_shapes_on_gpu(kind):
    for n, k in [(3072, 2048), (16384, 2048), (2048, 8192), (4096, 14336)]:
        x, w, g, r, silu = _operands(kind, n, k, torch.bfloat16, "cuda")
        got = torch.ops.kiln.gemv(x, w, g, r, 1e-5, silu)
        torch.testing.assert_close(got, gemv_ref(x, w, g, r, 1e-5, silu), atol=6e-2, rtol=2e-2)


def test_op_rejects_bad_shapes():
    x, w, g, r, _ = _operands("norm", 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.kiln.gemv(torch.cat([x, x]), w, g, None, 1e-5, False)
    with pytest.raises(ValueError, match="residual must have shape"):
        torch.ops.kiln.gemv(x, w, None, torch.zeros(1, 9), 1e-5, False)
    with pytest.raises(ValueError, match="norm_weight"):
        torch.ops.kiln.gemv(torch.cat([x, x], 1), w, g, None, 1e-5, True)


def _rms(h, w, eps):
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def layer(h, g1, w_qkv, w_o, g2, w_gate_up, w_down):
    """A decoder layer's products and their neighbours (attention replaced by a multiply)."""
    attn = F.linear(_rms(h, g1, 1e-5), w_qkv)[:, :32] * 2
    h = h + F.linear(attn, w_o)
    gate, up = F.linear(_rms(h, g2, 1e-5), w_gate_up).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, w_down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, matches", [(1, 4), (3, 0)])
def test_pass_fuses_one_row_products_only(dtype, rows, matches):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(dtype)

    args = [r(rows, 32), r(32) + 1, r(48, 32), r(32, 32), r(32) + 1, r(128, 32), r(32, 64)]
    gm = make_fx(layer, select_decomp_table(), tracing_mode="fake")(*args)
    gm.graph.eliminate_dead_code()
    assert fusion_gemv.build().apply(gm.graph) == matches
    gm.graph.eliminate_dead_code()
    gm.recompile()
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count("kiln.gemv.default") == matches
    if matches:  # every product, norm and SiLU went into the four kernels
        assert not any(op.startswith(("aten.mm", "aten.rsqrt", "aten.exp", "aten.sigmoid")) for op in ops)
    exact = dict(atol=0, rtol=0) if matches else {}  # the fused op runs the torch reference on CPU
    torch.testing.assert_close(gm(*args), layer(*args), **exact)


def _static_gemv_matches_eager(ckpt: str, matches: int, cache_dir: str, tol: float) -> None:
    got, want, report = static_and_eager(ckpt, cache_dir, "fuse_gemv", dtype="float32")
    assert report.static_compiles == 3 and report.pattern_matches["fuse_gemv"] == matches
    assert_same_greedy(got, want, tol)


@pytest.mark.parametrize("arch, matches", [("llama", 8), ("qwen2", 6)])
def test_static_size_one_compile_uses_gemv_and_matches_eager(arch, matches, tiny_checkpoint, tmp_path):
    """Greedy tokens and logprobs of a batch-1 decode through the fused static compile equal eager.
    2 layers: qkv, o, gate/up and down in each (Qwen2's qkv has a bias: left to Inductor)."""
    _static_gemv_matches_eager(tiny_checkpoint(arch), matches, str(tmp_path), 1e-4)


@pytest.mark.gpu
def test_static_gemv_in_cuda_graphs_matches_eager(tiny_checkpoint, tmp_path):
    """On the GPU: the Triton kernel, inside the full CUDA graph of the one-token step."""
    _static_gemv_matches_eager(tiny_checkpoint("llama"), 8, str(tmp_path), 1e-3)
