"""Per-projection LoRA kernel time at model shapes: ``kiln::lora_add``'s plan and every plan forced.

    python benchmarks/lora_kernels.py --models llama-1b,llama-8b [--batch-sizes 1,4,16,64] [--rank 16]
        [--sweep] [--output PATH]

For each wrapped projection of a decoder layer (qkv, o, gate/up, down) and batch size, a rank-``--rank``
table of 4 slots (token ``t`` uses slot ``t % 4``) in bfloat16; enough copies of the tables are cycled to
outrun the L2 cache (as a stack of layers does) and the calls are replayed in one CUDA graph (the timing of
``benchmarks/gemv.py``). Device time per call of:

* ``plan``: what kiln runs now (``lora_plan``'s choice, named in ``plan_name``), and every plan forced:
  ``fused``, ``split``, ``grouped``; ``base_rows``: the plan with every token at slot -1 (what a
  base-model request on a LoRA engine pays);
* with ``--stacked``: ``stacked``, the base product over ``[W; A]`` (every slot's ``A`` as extra
  rows of the base weight) less the plain one, plus one expand from the product's tail
  (``stacked_gemm_extra``, ``stacked_expand``); ``stacked_grouped`` the same with the expand grouped by
  slot (``stacked_grouped_expand``);
* with ``--sweep``: the fused plan with grids aimed at 24, 48, 96 and 132 programs, and with other
  shrink tiles (elements of ``A`` per iteration) and warp counts (kiln's at rank 16: 48 programs,
  32768, 8 warps).

``per_step_us`` sums a variant over the model's layers and projections at each batch size: the LoRA
kernels' share of a decode step. Every variant's largest difference from the torch reference is recorded.
On CPU the kernels run in Triton's interpreter and the times (wall clock of one call) mean nothing.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kiln.bench.common import int_list  # noqa: E402
from kiln.bench.shapes import SHAPES  # noqa: E402
from kiln.lora.targets import projection_shapes  # noqa: E402
from kiln.models.config import ModelConfig  # noqa: E402
from kiln.ops import triton_lora  # noqa: E402
from kiln.ops.lora_ref import lora_add_ref_  # noqa: E402

SLOTS = 4
SWEEP_PROGRAMS = (24, 48, 96, 132)
SWEEP_TILES = ((8192, 4), (16384, 4), (32768, 8), (32768, 16))  # elements of A per shrink iteration, warps
TABLE_BYTES = 96 << 20  # table copies cycled per projection, to outrun the H200's 50 MiB L2


def fused_with(**launch):
    """The fused plan with launch overrides (``programs``, ``tile``, ``warps``)."""
    return lambda y, x, a, b, s, o, st, sl: triton_lora.lora_add_fused(y, x, a, b, s, sl, **launch)


def variants(sweep: bool) -> dict:
    tl_ = triton_lora
    out = {
        "plan": tl_.lora_add_triton,
        "fused": fused_with(),
        "split": lambda y, x, a, b, s, o, st, sl: tl_.lora_add_split(y, x, a, b, s, sl),
        "grouped": lambda y, x, a, b, s, o, st, sl: tl_.lora_add_grouped(y, x, a, b, o, st, sl),
    }
    if sweep:
        for programs in SWEEP_PROGRAMS:
            out[f"fused_{programs}_programs"] = fused_with(programs=programs)
        for tile, warps in SWEEP_TILES:
            out[f"fused_tile_{tile}_warps_{warps}"] = fused_with(tile=tile, warps=warps)
    return out


def timer(fn, copies: int) -> float:
    """Seconds per call of ``fn(j)``: CUDA-graph device time on CUDA, one wall-clock call elsewhere."""
    if torch.cuda.is_available():
        from gemv import graph_time  # benchmarks/gemv.py

        return graph_time(fn, copies)
    fn(0)
    t0 = time.perf_counter()
    fn(1 % copies)
    return time.perf_counter() - t0


def slot_buffers(num_tokens: int, dev, base_rows: bool = False):
    slots = torch.arange(num_tokens, device=dev, dtype=torch.int32) % SLOTS
    if base_rows:
        slots.fill_(-1)
    order = torch.cat([(slots == s).nonzero().squeeze(1) for s in range(SLOTS)]).to(torch.int32)
    counts = torch.stack([(slots == s).sum() for s in range(SLOTS)])
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return slots, order, starts


def time_variant(fn, x, y0, tables, buffers, slices) -> dict:
    """One variant's time per call and its largest difference from the torch reference."""
    a, b = tables[0]
    ref, out = y0.clone(), y0.clone()
    lora_add_ref_(ref, x, a, b, buffers[0], slices)
    fn(out, x, a, b, *buffers, slices)
    err = (out.float() - ref.float()).abs().max().item()
    y = y0.clone()
    us = timer(lambda j: fn(y, x, *tables[j], *buffers, slices), len(tables)) * 1e6
    return {"us": us, "max_abs_err_vs_torch": err}


def bench_projection(
    k: int, slices: list[int], rank: int, batch_sizes, sweep: bool, stacked: bool = False
) -> list[dict]:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, n = torch.bfloat16, sum(slices)
    per_copy = (len(slices) * rank * k + n * rank) * 2 * SLOTS
    copies = min(256, max(2, -(-TABLE_BYTES // per_copy))) if dev == "cuda" else 2
    gen = torch.Generator(device=dev).manual_seed(0)
    tables = [
        (
            torch.randn(SLOTS, len(slices), rank, k, device=dev, dtype=dtype, generator=gen) * 0.02,
            torch.randn(SLOTS, n, rank, device=dev, dtype=dtype, generator=gen) * 0.02,
        )
        for _ in range(copies)
    ]
    rows = []
    for t in batch_sizes:
        x = torch.randn(t, k, device=dev, dtype=dtype, generator=gen)
        y0 = torch.randn(t, n, device=dev, dtype=dtype, generator=gen)
        row = {"k": k, "slices": slices, "batch": t, "copies": copies}
        row["plan_name"] = triton_lora.lora_plan(t, k, rank, n, len(slices))
        for base_rows in (False, True):
            buffers = slot_buffers(t, dev, base_rows)
            for name, fn in variants(sweep).items():
                if not base_rows or name == "plan":
                    key = "base_rows" if base_rows else name
                    row[key] = time_variant(fn, x, y0, tables, buffers, slices)
        if stacked:
            row.update(time_stacked(x, tables, slot_buffers(t, dev), slices, gen))
        rows.append(row)
    return rows


def time_stacked(x, tables, buffers, slices, gen) -> dict:
    """The LoRA cost when the base weight carries every slot's ``A`` as extra rows: the base product's
    extra time over those rows (``stacked_gemm_extra``: ``x @ [W; A].T`` minus ``x @ W.T``, weight
    copies cycled past the L2) plus one expand from its tail (``stacked_expand``); ``stacked`` is the
    sum, to set beside ``plan``. The expand's difference from the torch reference is recorded."""
    from kiln.ops.lora_ref import lora_expand_stacked_ref_

    dev, dtype, k, n = x.device, x.dtype, x.shape[1], sum(slices)
    a0 = tables[0][0]
    rows = n + a0.numel() // k  # the base weight's rows and every slot's A rows
    copies = max(2, -(-(128 << 20) // (rows * k * 2))) if dev.type == "cuda" else 1
    weights = [torch.randn(n, k, device=dev, dtype=dtype, generator=gen) * 0.02 for _ in range(copies)]
    stacked = [torch.cat([w, a0.reshape(-1, k)]) for w in weights]
    linear = torch.nn.functional.linear
    base_us = timer(lambda j: linear(x, weights[j]), copies) * 1e6
    stacked_us = timer(lambda j: linear(x, stacked[j]), copies) * 1e6
    slots = buffers[0]
    out = linear(x, stacked[0])
    ref, got = out.clone(), out.clone()
    lora_expand_stacked_ref_(ref[:, :n], ref[:, n:], tables[0][1], slots, slices)
    triton_lora.lora_expand_stacked(got[:, :n], got[:, n:], tables[0][1], slots, slices)
    err = (got.float() - ref.float()).abs().max().item()
    work = out.clone()
    expand_us = (
        timer(
            lambda j: triton_lora.lora_expand_stacked(work[:, :n], work[:, n:], tables[j][1], slots, slices),
            len(tables),
        )
        * 1e6
    )
    _, order, starts = buffers
    grouped_got = out.clone()
    triton_lora.grouped.lora_expand_stacked_grouped(
        grouped_got[:, :n], grouped_got[:, n:], tables[0][1], order, starts, slices
    )
    grouped_err = (grouped_got.float() - ref.float()).abs().max().item()
    grouped_us = (
        timer(
            lambda j: triton_lora.grouped.lora_expand_stacked_grouped(
                work[:, :n], work[:, n:], tables[j][1], order, starts, slices
            ),
            len(tables),
        )
        * 1e6
    )
    extra = stacked_us - base_us
    return {
        "stacked_gemm_extra": {"us": extra, "base_gemm_us": base_us},
        "stacked_expand": {"us": expand_us, "max_abs_err_vs_torch": err},
        "stacked_grouped_expand": {"us": grouped_us, "max_abs_err_vs_torch": grouped_err},
        "stacked": {"us": extra + expand_us},
        "stacked_grouped": {"us": extra + grouped_us},
    }


def bench_model(model: str, rank: int, batch_sizes, sweep: bool, stacked: bool = False) -> dict:
    cfg = ModelConfig.from_dict(SHAPES[model])
    projections = {}
    for name, (k, slices) in projection_shapes(cfg).items():
        projections[name] = rows = bench_projection(k, slices, rank, batch_sizes, sweep, stacked)
        for row in rows:
            times = "  ".join(f"{v}={row[v]['us']:.2f}" for v in row if isinstance(row[v], dict))
            print(f"{model} {name:20s} batch {row['batch']:3d} [{row['plan_name']}] us: {times}", flush=True)
    per_step = {}
    for i, t in enumerate(batch_sizes):
        names = [v for v, value in projections["mlp.down_proj"][i].items() if isinstance(value, dict)]
        per_step[str(t)] = {
            v: cfg.num_layers * sum(rows[i][v]["us"] for rows in projections.values()) for v in names
        }
        summary = "  ".join(f"{v}={us:.1f}" for v, us in per_step[str(t)].items())
        print(f"{model} per decode step, batch {t}: us {summary}", flush=True)
    return {"layers": cfg.num_layers, "projections": projections, "per_step_us": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-1b,llama-8b", help="named shapes, comma-separated")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 4, 16, 64])
    parser.add_argument("--rank", type=int, default=16, help="the table's rank (max_lora_rank, power of 2)")
    parser.add_argument("--sweep", action="store_true", help="also the fused plan at other grid sizes")
    parser.add_argument(
        "--stacked",
        action="store_true",
        help="also the base weight with every slot's A appended (one expand)",
    )
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    results = {
        m: bench_model(m, args.rank, args.batch_sizes, args.sweep, args.stacked)
        for m in args.models.split(",")
    }
    from gemv import write_results  # benchmarks/gemv.py: the common result schema

    write_results(args, "lora_kernels", results)
    if args.output:
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
