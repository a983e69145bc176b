"""Decode attention over split counts and tile configs around the defaults (bf16, 32 query / 8 kv heads,
head_dim 128, block 16): the split kernel plus its merge kernel, as ``paged_attention_triton`` runs them.

Each row is the per-layer time of 8 layers (own caches) replayed back to back from one CUDA graph, as in
``benchmarks/attention.py``; ``default_splits`` is what ``choose_num_splits`` picks for the shape.

    python3 benchmarks/decode_sweep.py --out benchmarks/results/decode_sweep_h200.json
"""

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import (  # noqa: E402
    DTYPE,
    HEAD_DIM,
    KV_HEADS,
    SCALE,
    copy_bandwidth,
    machine_info,
    paged_batch,
)

from kiln.ops.triton_attention import choose_num_splits  # noqa: E402
from kiln.ops.triton_decode import decode_attention  # noqa: E402


def launch(q, cache, md, out, splits, block_n, warps, stages, min_split):
    cfg = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    decode_attention(q, cache, md, SCALE, 0, out, splits, cfg, min_split=min_split)


def per_layer_us(fn, layers: int) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench(graph.replay, warmup=10, rep=30, return_mode="median") * 1e3 / layers
    except Exception as e:  # a config may exceed shared memory or registers
        print("failed:", type(e).__name__, str(e)[:160], flush=True)
        return None


def _layers_step(q, caches, md, out, *config) -> None:
    for c in caches:
        launch(q, c, md, out, *config)


def sweep_case(batch: int, context: int, copy_gbps: float, gen: torch.Generator) -> list[dict]:
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    layers = max(1, min(8, 4 * 2**30 // kv_bytes))
    cache, q, md = paged_batch(batch, context, 1, gen)
    caches = [cache] + [torch.empty_like(cache).normal_(generator=gen) for _ in range(layers - 1)]
    out = torch.empty_like(q)
    default = choose_num_splits(batch, KV_HEADS, context, q.device)
    # from a sixteenth of the default split count (few programs, long loops, wide tiles) to twice it
    splits = sorted({max(1, default * k // 16) for k in (1, 2, 4, 8, 16, 32)})
    tiles = [(16, 1), (32, 1), (32, 2), (64, 2), (64, 4), (128, 4), (128, 8)]
    rows = []
    for n, (block_n, warps), stages, min_split in itertools.product(splits, tiles, (2, 3), (32,)):
        config = (n, block_n, warps, stages, min_split)
        us = per_layer_us(functools.partial(_layers_step, q, caches, md, out, *config), layers)
        if us is None:
            continue
        row = dict(
            batch=batch, context=context, splits=n, default_splits=default, BLOCK_N=block_n, num_warps=warps,
            num_stages=stages, min_split=min_split, us=us, frac_of_copy=kv_bytes / us / 1e3 / copy_gbps,
        )  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1x4096,1x16384,1x32768,8x4096,64x4096")
    p.add_argument("--out", default="benchmarks/results/decode_sweep.json")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = machine_info(sys.argv)
    result["copy_GBps"] = copy_bandwidth()
    print(json.dumps(result), flush=True)
    rows = result["rows"] = []
    for case in args.cases.split(","):
        batch, context = map(int, case.split("x"))
        rows += sweep_case(batch, context, result["copy_GBps"], gen)
        torch.cuda.empty_cache()
        best = sorted((r for r in rows if r["batch"] == batch and r["context"] == context),
                      key=lambda r: r["us"])[:5]  # fmt: skip
        print(f"best for {case}:", *(json.dumps(r) for r in best), sep="\n  ", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
