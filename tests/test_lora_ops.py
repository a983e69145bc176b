"""The batched LoRA products: torch reference against the plain formula, the Triton kernels (both
families, under TRITON_INTERPRET=1 on CPU) against the reference, and the custom ops' fake impls."""

import pytest
import torch

import kiln.ops.lora_op  # noqa: F401
from kiln.ops.lora_ref import lora_expand_ref_, lora_shrink_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/conftest.py)
SLICES = [24, 8, 8]  # a fused q/k/v-like projection: three shards of different widths
K, R, SLOTS = 40, 16, 3


def _case(num_tokens: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, K, generator=gen).to(dtype)
    a = torch.randn(SLOTS, len(SLICES), R, K, generator=gen).to(dtype)
    b = torch.randn(SLOTS, sum(SLICES), R, generator=gen).to(dtype)
    y = torch.randn(num_tokens, sum(SLICES), generator=gen).to(dtype)
    # runs of tokens per slot, base-model tokens (-1) among them, slot 1 used twice
    pattern = [0, 0, -1, 2, 2, 2, 1, -1, 1, 1]
    slots = torch.tensor([pattern[i % len(pattern)] for i in range(num_tokens)], dtype=torch.int32)
    order = [t for s in range(SLOTS) for t in range(num_tokens) if slots[t] == s]
    starts = [0]
    for s in range(SLOTS):
        starts.append(starts[-1] + int((slots == s).sum()))
    padded = torch.full((num_tokens + 7,), -1, dtype=torch.int32)  # buffers are longer than the batch
    padded[:num_tokens] = slots
    sorted_tokens = torch.zeros(num_tokens + 7, dtype=torch.int32)
    sorted_tokens[: len(order)] = torch.tensor(order, dtype=torch.int32)
    return x, a, b, y, padded, sorted_tokens, torch.tensor(starts, dtype=torch.int32)


def _formula(x, a, b, y, slots):
    """Token by token: y + concat_s(x @ a[slot, s].T @ b[slot, cols_s].T)."""
    out = y.clone().double()
    for t in range(x.shape[0]):
        slot = int(slots[t])
        if slot < 0:
            continue
        lo = 0
        for s, size in enumerate(SLICES):
            cols = slice(lo, lo + size)
            out[t, cols] += x[t].double() @ a[slot, s].double().T @ b[slot, cols].double().T
            lo += size
    return out


def test_reference_matches_formula():
    x, a, b, y, slots, _, _ = _case(10)
    h = lora_shrink_ref(x, a, slots)
    out = y.clone()
    lora_expand_ref_(out, h, b, slots, SLICES)
    torch.testing.assert_close(out.double(), _formula(x, a, b, y, slots), atol=1e-4, rtol=1e-5)
    base_rows = slots[:10] < 0
    assert torch.equal(out[base_rows], y[base_rows])  # base-model rows untouched


# both families, shrink whole (512) and split over 3 chunks of K=40 (16 features each)
@pytest.mark.parametrize("k_per_split", [512, 16])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 10, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_reference(grouped, k_per_split, num_tokens, dtype, monkeypatch):
    pytest.importorskip("triton")
    import kiln.ops.triton_lora as triton_lora
    from kiln.ops.triton_lora import lora_expand_triton, lora_shrink_triton

    monkeypatch.setattr(triton_lora, "K_PER_SPLIT", k_per_split)

    case = _case(num_tokens, dtype, seed=num_tokens)
    x, a, b, y, slots, sorted_tokens, starts = (t.to(DEV) for t in case)
    # bf16: products of ~25 in magnitude, rounded to 8 mantissa bits
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    h_ref = lora_shrink_ref(x, a, slots)
    h = torch.full_like(h_ref, float("nan"))
    lora_shrink_triton(x, a, h, slots, sorted_tokens, starts, grouped)
    rows = slots[:num_tokens] >= 0
    torch.testing.assert_close(h[rows], h_ref[rows], **tol)

    ref, out = y.clone(), y.clone()
    lora_expand_ref_(ref, h, b, slots, SLICES)
    lora_expand_triton(out, h, b, slots, sorted_tokens, starts, SLICES, grouped)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    assert torch.equal(out[~rows], y[~rows])


@pytest.mark.parametrize("slices", [[40], [24, 16]])
def test_triton_expand_one_and_two_shards(slices):
    pytest.importorskip("triton")
    from kiln.ops.triton_lora import lora_expand_triton

    x, a, b, y, slots, sorted_tokens, starts = (t.to(DEV) for t in _case(10, seed=3))
    h = lora_shrink_ref(x, a[:, : len(slices)], slots)
    for grouped in (False, True):
        ref, out = y.clone(), y.clone()
        lora_expand_ref_(ref, h, b, slots, slices)
        lora_expand_triton(out, h, b, slots, sorted_tokens, starts, slices, grouped)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)


def test_custom_ops_fake_and_schema():
    x, a, b, y, slots, sorted_tokens, starts = _case(10)
    h = lora_shrink_ref(x, a, slots)
    torch.library.opcheck(torch.ops.kiln.lora_shrink.default, (x, a, slots, sorted_tokens, starts))
    torch.library.opcheck(
        torch.ops.kiln.lora_expand.default, (y.clone(), h, b, slots, sorted_tokens, starts, SLICES)
    )


def test_custom_ops_under_torch_compile():
    """Dynamo traces around the ops (fake impls), and the compiled graph reads the slot buffers at
    run time: new slot contents, same compiled code."""
    x, a, b, y, slots, sorted_tokens, starts = _case(10)

    def f(x, y):
        h = torch.ops.kiln.lora_shrink(x, a, slots, sorted_tokens, starts)
        y = y * 1.0
        torch.ops.kiln.lora_expand(y, h, b, slots, sorted_tokens, starts, SLICES)
        return y + 1

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), f(x, y))
    slots[:10] = torch.tensor([2, 2, 2, 0, 0, 1, 1, -1, -1, 0], dtype=torch.int32)
    torch.testing.assert_close(compiled(x, y), f(x, y))
