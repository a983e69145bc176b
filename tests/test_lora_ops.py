"""The batched LoRA products: torch reference against the plain formula, each Triton kernel plan (under
TRITON_INTERPRET=1 on CPU) against the reference, the kernels each plan launches, and the custom op's
fake impl and tracing."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kiln.ops.lora_op  # noqa: F401
from kiln.ops.lora_ref import lora_add_ref_, lora_expand_ref_, lora_shrink_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/conftest.py)
SLICES = [24, 8, 8]  # a fused q/k/v-like projection: three shards of different widths
WIDE = [200, 72, 72]  # wider shards: column blocks of 128 that straddle shards, N = 344 not a multiple
K, R, SLOTS = 40, 16, 3
PADDED_SLOT, PADDED_RANK = 2, 8  # slot 2 holds an adapter of rank 8, zero-padded to the table's rank
PATTERN = [0, 0, -1, 2, 2, 2, 1, -1, 1, 1]  # runs of tokens per slot, base-model tokens (-1) among them


def _case(num_tokens: int, dtype=torch.float32, seed: int = 0, slices=SLICES, rank=R, pattern=PATTERN):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, K, generator=gen).to(dtype)
    a = torch.randn(SLOTS, len(slices), rank, K, generator=gen)
    b = torch.randn(SLOTS, sum(slices), rank, generator=gen)
    a[PADDED_SLOT, :, PADDED_RANK:] = 0
    b[PADDED_SLOT, :, PADDED_RANK:] = 0
    a, b = a.to(dtype), b.to(dtype)
    y = torch.randn(num_tokens, sum(slices), generator=gen).to(dtype)
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


def _formula(x, a, b, y, slots, slices=SLICES):
    """Token by token: y + concat_s(x @ a[slot, s].T @ b[slot, cols_s].T)."""
    out = y.clone().double()
    for t in range(x.shape[0]):
        slot = int(slots[t])
        if slot < 0:
            continue
        lo = 0
        for s, size in enumerate(slices):
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
    again = y.clone()
    lora_add_ref_(again, x, a, b, slots, SLICES)
    assert torch.equal(again, out)


def _tol(dtype):
    # bf16: products of ~25 in magnitude, rounded to 8 mantissa bits
    return dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)


def _launchers():
    from kiln.ops import triton_lora

    return {
        "fused": lambda y, x, a, b, s, o, st, sl: triton_lora.lora_add_fused(y, x, a, b, s, sl),
        "split": lambda y, x, a, b, s, o, st, sl: triton_lora.lora_add_split(y, x, a, b, s, sl),
        "grouped": lambda y, x, a, b, s, o, st, sl: triton_lora.lora_add_grouped(y, x, a, b, o, st, sl),
    }


def _check_plan(plan, num_tokens, dtype, slices, rank, seed, pattern=PATTERN):
    case = _case(num_tokens, dtype, seed=seed, slices=slices, rank=rank, pattern=pattern)
    x, a, b, y, slots, sorted_tokens, starts = (t.to(DEV) for t in case)
    ref, out = y.clone(), y.clone()
    lora_add_ref_(ref, x, a, b, slots, slices)
    _launchers()[plan](out, x, a, b, slots, sorted_tokens, starts, slices)
    torch.testing.assert_close(out.float(), ref.float(), **_tol(dtype))
    base_rows = slots[:num_tokens] < 0
    assert torch.equal(out[base_rows], y[base_rows])  # rows without an adapter untouched
    if dtype == torch.float32:  # and the oracle itself is the plain formula
        torch.testing.assert_close(out.double(), _formula(x, a, b, y, slots, slices), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("small_blocks", [False, True])
@pytest.mark.parametrize("slices", [SLICES, WIDE], ids=["narrow", "wide"])
@pytest.mark.parametrize("num_tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("plan", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_plans_match_reference(plan, num_tokens, slices, small_blocks, dtype, monkeypatch):
    """The gathered (per row) plans at decode batch sizes; ``small_blocks`` loops over several blocks of
    input features (fused: 16 per iteration; split: chunks of 16, i.e. 3 partial sums of K = 40) and,
    fused, gives each program several column blocks (a grid aimed at 2 programs)."""
    pytest.importorskip("triton")
    from kiln.ops import triton_lora

    if small_blocks:
        monkeypatch.setattr(triton_lora, "_FUSED_TILE", R * 16)
        monkeypatch.setattr(triton_lora, "K_PER_SPLIT", 16)
        monkeypatch.setattr(triton_lora, "FUSED_PROGRAMS", 2)
    _check_plan(plan, num_tokens, dtype, slices, R, seed=num_tokens)


@pytest.mark.parametrize("plan", ["fused", "split", "grouped"])
@pytest.mark.parametrize("rank", [16, 32, 64])
def test_plans_at_table_ranks(plan, rank):
    """Table ranks 16, 32 and 64 (max_lora_rank rounded up; smaller blocks of columns and features as R
    grows), slot 2's rank-8 adapter zero-padded in each."""
    pytest.importorskip("triton")
    _check_plan(plan, 5, torch.float32, WIDE, rank, seed=rank)


@pytest.mark.parametrize("plan", ["fused", "split", "grouped"])
def test_plans_all_base_rows(plan):
    """A batch of base-model tokens only: every program exits at once, ``y`` is untouched."""
    pytest.importorskip("triton")
    _check_plan(plan, 4, torch.float32, WIDE, R, seed=1, pattern=[-1])


def _stacked_case(num_tokens, dtype, slices, rank, seed, pattern=PATTERN):
    """A base weight with every slot's A as extra rows, and the product over it: ``(x, w, a, b, out,
    slots)``, ``out`` ``[T, N + slots * shards * R]`` (head: base product, tail: every slot's shrink)."""
    x, a, b, _, slots, _, _ = _case(num_tokens, dtype, seed=seed, slices=slices, rank=rank, pattern=pattern)
    n, k = sum(slices), x.shape[1]
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.1).to(dtype)
    stacked = torch.cat([w, a.reshape(-1, k)])
    out = (x.float() @ stacked.float().T).to(dtype)  # the base product's rounding, as the GEMM's
    return x, w, a, b, out, slots


@pytest.mark.parametrize("slices", [SLICES, WIDE, [40]], ids=["narrow", "wide", "one"])
def test_stacked_expand_reference_matches_formula(slices):
    x, w, a, b, out, slots = _stacked_case(10, torch.float32, slices, R, seed=3)
    n = sum(slices)
    y = out[:, :n]  # a view of the product's head: the expand adds into it in place
    from kiln.ops.lora_ref import lora_expand_stacked_ref_

    lora_expand_stacked_ref_(y, out[:, n:], b, slots, slices)
    expected = _formula(x, a, b, x @ w.T, slots, slices)
    torch.testing.assert_close(out[:, :n].double(), expected, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("way", ["gathered", "grouped", "by_count"])
@pytest.mark.parametrize("num_tokens", [1, 3, 10, 37])
@pytest.mark.parametrize("slices", [SLICES, WIDE], ids=["narrow", "wide"])
@pytest.mark.parametrize("rank", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stacked_expand_kernel_matches_reference(num_tokens, slices, rank, dtype, way, monkeypatch):
    """The stacked expands (per token, by tiles of a slot's tokens, and the pick by token count, here
    switching above 4 tokens) on column slices of one product (the layout a base weight with the slots'
    A rows appended gives): its head gets each token's delta, base-model rows and the tail stay."""
    pytest.importorskip("triton")
    from kiln.ops import triton_lora, triton_lora_grouped
    from kiln.ops.lora_ref import lora_expand_stacked_ref_

    monkeypatch.setattr(triton_lora, "STACKED_GATHER_MAX_TOKENS", 4)
    x, w, a, b, out, slots = (t.to(DEV) for t in _stacked_case(num_tokens, dtype, slices, rank, seed=rank))
    *_, order, starts = (t.to(DEV) for t in _case(num_tokens, dtype, slices=slices, rank=rank))
    n = sum(slices)
    ref, got = out.clone(), out.clone()
    lora_expand_stacked_ref_(ref[:, :n], ref[:, n:], b, slots, slices)
    if way == "gathered":
        triton_lora.lora_expand_stacked(got[:, :n], got[:, n:], b, slots, slices)
    elif way == "grouped":
        triton_lora_grouped.lora_expand_stacked_grouped(got[:, :n], got[:, n:], b, order, starts, slices)
    else:
        triton_lora.lora_expand_stacked_triton(got[:, :n], got[:, n:], b, slots, order, starts, slices)
    torch.testing.assert_close(got.float(), ref.float(), **_tol(dtype))
    base_rows = slots[:num_tokens] < 0
    assert torch.equal(got[base_rows], out[base_rows])
    assert torch.equal(got[:, n:], out[:, n:])


# the grouped (segment) plan, K whole (512) and split over 3 chunks of K=40 (16 features each)
@pytest.mark.parametrize("k_per_split", [512, 16])
@pytest.mark.parametrize("num_tokens", [1, 10, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_plan_matches_reference(k_per_split, num_tokens, dtype, monkeypatch):
    pytest.importorskip("triton")
    from kiln.ops import triton_lora_grouped

    monkeypatch.setattr(triton_lora_grouped, "K_PER_SPLIT", k_per_split)
    _check_plan("grouped", num_tokens, dtype, SLICES, R, seed=num_tokens)


@pytest.mark.parametrize("slices", [[40], [24, 16]])
@pytest.mark.parametrize("plan", ["fused", "split", "grouped"])
def test_plans_one_and_two_shards(plan, slices):
    pytest.importorskip("triton")
    _check_plan(plan, 10 if plan == "grouped" else 3, torch.float32, slices, R, seed=3)


def test_plan_is_a_function_of_shapes():
    from kiln.ops.triton_lora import FUSED_MAX_K, FUSED_PROGRAMS, fused_columns, lora_plan, rows_block_n

    # llama-1b's and llama-8b's projections (K, N, shards): fused while tokens x K x N / shards < 2^24
    assert [lora_plan(t, 2048, 16, 3072, 3) for t in (1, 2, 4)] == ["fused"] * 3  # 1b q/k/v
    assert lora_plan(1, 4096, 16, 6144, 3) == "fused"  # 8b q/k/v
    assert lora_plan(1, 2048, 16, 2048) == lora_plan(4, 2048, 16, 2048 - 1) == "fused"
    assert lora_plan(1, 4096, 16, 4096) == lora_plan(1, 4096, 16, 28672, 2) == "split"  # 8b o, gate/up
    assert lora_plan(4, 2048, 16, 2048) == lora_plan(4, 2048, 16, 16384, 2) == "grouped"
    assert lora_plan(1, FUSED_MAX_K + 1) == lora_plan(1, 14336, 16, 4096) == "grouped"  # down
    assert [lora_plan(t, 2048, 16, 2048) for t in (5, 8, 16, 17, 4096)] == ["grouped"] * 5
    assert lora_plan(1, 2048, rank=64) == "fused" and lora_plan(1, 2048, rank=128) == "grouped"
    assert [rows_block_n(r) for r in (16, 32, 64, 128, 256)] == [128, 64, 32, 16, 16]
    for t, n in ((1, 3072), (1, 28672), (4, 16384), (4, 40)):
        cols = fused_columns(t, n)
        assert cols % 128 == 0 and -(-n // cols) * t <= FUSED_PROGRAMS + t
    assert fused_columns(1, 3072) == 128  # llama-1b qkv at batch 1: 24 programs of 128 columns
    assert fused_columns(1, 16384) == 384  # llama-1b gate/up: 43 programs
    assert fused_columns(1, 40) == fused_columns(4, 40) == 128
    assert fused_columns(1, 3072, rank=64) == 64  # multiples of the rank's block of 32 columns


class _CountMemsets(TorchDispatchMode):
    """Counts the zeroing / fill ops (each a kernel on the GPU) dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.zero_, torch.ops.aten.fill_):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "num_tokens,k,work,kernels",
    [(1, K, None, 1), (4, K, None, 1), (1, K, 1, 2), (1, 4097, None, 3), (8, K, None, 2), (17, 600, None, 3)],
)
def test_kernels_launched_per_projection(num_tokens, k, work, kernels, monkeypatch):
    """What one ``lora_add`` launches on the device: Triton kernels plus zeroings. Up to 4 tokens (K
    <= 4096, below the work bound) one kernel; the split plan (one token past the bound, lowered
    here to ``work``) two; the grouped plan three when it splits K, else two."""
    pytest.importorskip("triton")
    from kiln.ops import triton_lora, triton_lora_grouped

    if work is not None:
        monkeypatch.setattr(triton_lora, "FUSED_MAX_WORK", work)
    launches = []

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for module in (triton_lora, triton_lora_grouped):
        for name in vars(module).copy():
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, Counted(name, getattr(module, name)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_tokens, k, generator=gen)
    a = torch.randn(2, 1, R, k, generator=gen)
    b = torch.randn(2, 24, R, generator=gen)
    y = torch.zeros(num_tokens, 24)
    slots = torch.zeros(num_tokens, dtype=torch.int32)
    order = torch.arange(num_tokens, dtype=torch.int32)
    starts = torch.tensor([0, num_tokens, num_tokens], dtype=torch.int32)
    with _CountMemsets() as memsets:
        triton_lora.lora_add_triton(y, x, a, b, slots, order, starts, [24])
    expected = triton_lora.lora_kernels(num_tokens, k, R, 24)
    assert len(launches) + memsets.count == kernels == expected, launches
    ref = torch.zeros(num_tokens, 24)
    lora_add_ref_(ref, x, a, b, slots, [24])
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-4)


class _NotALinear(torch.nn.Linear):
    """A replacement base (as fp8 or GGUF modules are): not stacked, ``lora_add`` after it."""


def _wrapped(base, bias=False):
    from kiln.lora.batch import LoRABatch
    from kiln.lora.config import LoRAConfig
    from kiln.lora.layer import LoRALinear

    batch = LoRABatch(8, 2, torch.device("cpu"))
    config = LoRAConfig(max_loras=2, max_lora_rank=16)
    return LoRALinear(base, K, SLICES, config, batch, torch.float32, "cpu"), batch


@pytest.mark.parametrize("base_cls", [torch.nn.Linear, _NotALinear], ids=["stacked", "lora_add"])
def test_one_lora_op_per_projection_in_the_traced_graph(base_cls):
    """Dynamo traces a wrapped projection to its base product and one LoRA op: the stacked expand
    for a plain ``nn.Linear``, ``kiln::lora_add`` after any other base."""
    layer, _ = _wrapped(base_cls(K, 40, bias=False))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(3, K))
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    expected = "kiln.lora_expand_stacked" if base_cls is torch.nn.Linear else "kiln.lora_add"
    assert [t for t in targets if t.startswith("kiln.")] == [expected]


@pytest.mark.parametrize("bias", [False, True])
def test_stacked_layer_matches_the_lora_add_layer(bias):
    """The same base weights and adapters through both ways: equal outputs, per token and slot; the
    base parameter and the ``A`` table are views of the stacked weight (loading either writes it)."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(K, 40, bias=bias)
    other = _NotALinear(K, 40, bias=bias)
    stacked, batch = _wrapped(plain)
    reference, ref_batch = _wrapped(other)
    assert stacked.stacked and not reference.stacked
    with torch.no_grad():
        weight = torch.randn(40, K)
        stacked.weight.copy_(weight)  # as the checkpoint loader copies into the parameter
        reference.weight.copy_(weight)
        if bias:
            stacked.bias.copy_(torch.arange(40.0))
            reference.bias.copy_(torch.arange(40.0))
        for layer in (stacked, reference):
            gen = torch.Generator().manual_seed(1)
            layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=gen))
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen))
    assert torch.equal(stacked.stacked_weight[:40], weight)
    assert torch.equal(stacked.stacked_weight[40:].view(stacked.lora_a.shape), stacked.lora_a)
    pattern = torch.tensor([0, -1, 1, 1, 0], dtype=torch.int32)
    for b in (batch, ref_batch):
        b.token_slots[:5] = pattern
        b.sorted_tokens[:4] = torch.tensor([0, 4, 2, 3], dtype=torch.int32)
        b.slot_starts[:3] = torch.tensor([0, 2, 4], dtype=torch.int32)
    x = torch.randn(5, K)
    got, expected = stacked(x), reference(x)
    assert got.shape == (5, 40)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_stacked_custom_op_fake_and_schema():
    x, w, a, b, out, slots = _stacked_case(10, torch.float32, SLICES, R, seed=5)
    *_, order, starts = _case(10)
    torch.library.opcheck(
        torch.ops.kiln.lora_expand_stacked.default,
        (out.clone(), b, slots, order, starts, sum(SLICES), SLICES),
    )


def test_custom_op_fake_and_schema():
    x, a, b, y, slots, sorted_tokens, starts = _case(10)
    torch.library.opcheck(
        torch.ops.kiln.lora_add.default, (y.clone(), x, a, b, slots, sorted_tokens, starts, SLICES)
    )


def test_custom_op_under_torch_compile():
    """Dynamo traces around the op (fake impl), and the compiled graph reads the slot buffers at run
    time: new slot contents, same compiled code."""
    x, a, b, y, slots, sorted_tokens, starts = _case(10)

    def f(x, y):
        y = y * 1.0
        torch.ops.kiln.lora_add(y, x, a, b, slots, sorted_tokens, starts, SLICES)
        return y + 1

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), f(x, y))
    slots[:10] = torch.tensor([2, 2, 2, 0, 0, 1, 1, -1, -1, 0], dtype=torch.int32)
    torch.testing.assert_close(compiled(x, y), f(x, y))
