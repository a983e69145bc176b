"""Benchmark kiln's Triton paged attention against device copy bandwidth and torch SDPA.

Decode: achieved bandwidth (bytes of K and V read / time) of a pure-decode step over a paged bf16
cache (32 query / 8 kv heads, head_dim 128, block_size 16, blocks scattered at random), timed per
layer with up to 8 layers (own caches, up to 4 GiB in all) back to back in one CUDA graph as in a
model's decode step (``single_us``: a graph of one call, which adds the graph launch), next to the
device's copy bandwidth (clone of a large tensor: bytes read + written / time) and to
``scaled_dot_product_attention`` over the same K/V gathered into contiguous tensors (the query heads of
a kv head become SDPA's query positions, which is the same attention without GQA support).
Prefill: TFLOP/s of a causal prefill (counted as 2 * 2 * heads * head_dim * len^2 / 2 per sequence) vs
SDPA's flash backend on contiguous tensors. Timings are medians of ``triton.testing.do_bench`` (L2
flushed before each run) over CUDA-graph replays, so they measure device time without Python launch
overhead; decode also reports eager calls (``eager_us``), which include it.

    python3 benchmarks/attention.py --out benchmarks/results/attention_h100.json
    python3 benchmarks/attention.py --sweep all  # also time alternative tile configs
"""

import argparse
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.ops.metadata import AttentionMetadata  # noqa: E402
from kiln.ops.triton_attention import choose_num_splits, paged_attention_triton  # noqa: E402
from kiln.ops.triton_decode import decode_attention  # noqa: E402
from kiln.ops.triton_prefill import prefill_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
SCALE = HEAD_DIM**-0.5
LAYER_BYTES, MAX_LAYERS = 4 * 2**30, 8  # decode: layers per timed graph, as in a model's decode step


def machine_info(argv: list[str]) -> dict:
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    return dict(
        machine=platform.node(),
        gpu=torch.cuda.get_device_name(),
        driver=driver,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        command="python3 " + " ".join(argv),
    )


def paged_batch(batch: int, context: int, q_len: int, gen: torch.Generator):
    """A random paged cache holding ``batch`` sequences of ``context`` tokens, q and metadata."""
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    cache = torch.empty(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    cache.normal_(generator=gen)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, blocks_per_seq).int()
    q = torch.randn(batch * q_len, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    md = AttentionMetadata(
        slot_mapping=torch.zeros(batch * q_len, dtype=torch.int64, device="cuda"),
        query_start_loc=(torch.arange(batch + 1, device="cuda") * q_len).int(),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        block_tables=tables,
        max_query_len=q_len,
        max_seq_len=context,
    )
    return cache, q, md


def gathered_kv(cache: torch.Tensor, tables: torch.Tensor, which: int) -> torch.Tensor:
    """One of K/V as a contiguous ``[batch, kv_heads, context, head_dim]`` tensor."""
    batch = tables.shape[0]
    return cache[which][tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()


def graph_time(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph, L2 flushed before each replay."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6  # GB/s, read + write


def bench_decode(batch: int, context: int, copy_gbps: float, gen: torch.Generator) -> dict | None:
    """One decode step per layer, ``layers`` layers (each with its own cache) back to back in a graph."""
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    if kv_bytes > 0.85 * torch.cuda.mem_get_info()[0]:
        return None
    layers = max(1, min(MAX_LAYERS, LAYER_BYTES // kv_bytes))
    cache, q, md = paged_batch(batch, context, 1, gen)
    caches = [cache] + [torch.empty_like(cache).normal_(generator=gen) for _ in range(layers - 1)]
    out = torch.empty_like(q)

    def step():
        for c in caches:
            paged_attention_triton(q, c, md, SCALE, out=out)

    ms = graph_time(step) / layers
    ms_single = graph_time(lambda: paged_attention_triton(q, cache, md, SCALE, out=out))
    ms_eager = do_bench(lambda: paged_attention_triton(q, cache, md, SCALE, out=out), return_mode="median")
    row = dict(
        batch=batch,
        context=context,
        kv_bytes=kv_bytes,
        layers=layers,
        num_splits=choose_num_splits(batch, KV_HEADS, context, q.device),
        triton_us=ms * 1e3,
        triton_GBps=kv_bytes / ms / 1e6,
        frac_of_copy=kv_bytes / ms / 1e6 / copy_gbps,
        single_us=ms_single * 1e3,
        eager_us=ms_eager * 1e3,
    )
    if kv_bytes * (layers + 1.6) < torch.cuda.mem_get_info()[0]:
        kvs = [(gathered_kv(c, md.block_tables, 0), gathered_kv(c, md.block_tables, 1)) for c in caches]
        qg = q.view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        sdpa = lambda k, v: F.scaled_dot_product_attention(qg, k, v, scale=SCALE)
        torch.testing.assert_close(out, sdpa(*kvs[0]).view_as(q), atol=2e-2, rtol=2e-2)  # out: caches[0]
        ms_sdpa = graph_time(lambda: [sdpa(k, v) for k, v in kvs]) / layers
        row.update(sdpa_us=ms_sdpa * 1e3, sdpa_GBps=kv_bytes / ms_sdpa / 1e6)
    return row


def bench_prefill(length: int, tokens: int, gen: torch.Generator) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = max(1, tokens // length)
    cache, q, md = paged_batch(batch, length, length, gen)
    out = torch.empty_like(q)
    flops = 4 * batch * HEADS * HEAD_DIM * length * length / 2
    ms = graph_time(lambda: paged_attention_triton(q, cache, md, SCALE, out=out))
    qs = q.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
    group = HEADS // KV_HEADS
    k = gathered_kv(cache, md.block_tables, 0).repeat_interleave(group, dim=1)
    v = gathered_kv(cache, md.block_tables, 1).repeat_interleave(group, dim=1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=SCALE)
        ref = sdpa().transpose(1, 2)
        ms_sdpa = graph_time(sdpa)
    torch.testing.assert_close(out.view_as(ref), ref, atol=2e-2, rtol=2e-2)
    return dict(
        length=length,
        batch=batch,
        triton_us=ms * 1e3,
        triton_TFLOPs=flops / ms / 1e9,
        sdpa_us=ms_sdpa * 1e3,
        sdpa_TFLOPs=flops / ms_sdpa / 1e9,
        frac_of_sdpa=ms_sdpa / ms,
    )


def sweep(which: str, gen: torch.Generator) -> dict:
    """Time alternative tile configs and split counts (for tuning the defaults)."""
    results = {"decode": [], "prefill": []}
    decode_tiles = [(32, 4), (64, 4), (128, 4)]  # (BLOCK_N, num_warps)
    for batch, context in [(1, 32768), (8, 4096), (8, 32768), (32, 4096)] if which != "prefill" else []:
        cache, q, md = paged_batch(batch, context, 1, gen)
        out = torch.empty_like(q)
        base = choose_num_splits(batch, KV_HEADS, context, q.device)
        kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * DTYPE.itemsize
        splits_options = sorted({max(1, base // 2), base, 2 * base})
        for splits, (block_n, warps), stages in itertools.product(splits_options, decode_tiles, (2, 3, 4)):
            cfg = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            fn = lambda: decode_attention(q, cache, md, SCALE, 0, out, splits, cfg)  # noqa: B023
            ms = timed(fn, f"decode {batch}x{context} splits {splits} {cfg}")
            if ms is not None:
                row = dict(batch=batch, context=context, splits=splits, **cfg, GBps=kv_bytes / ms / 1e6)
                results["decode"].append(row)
                print(json.dumps(row), flush=True)
    prefill_tiles = [(64, 4), (128, 4), (128, 8)]  # (query rows, num_warps)
    for length in (2048, 8192) if which != "decode" else ():
        batch = 16384 // length
        cache, q, md = paged_batch(batch, length, length, gen)
        out = torch.empty_like(q)
        flops = 4 * batch * HEADS * HEAD_DIM * length * length / 2
        for (rows, warps), block_n, stages in itertools.product(prefill_tiles, (32, 64, 128), (2, 3, 4)):
            group = HEADS // KV_HEADS
            cfg = dict(BLOCK_Q=rows // group, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            fn = lambda: prefill_attention(q, cache, md, SCALE, 0, out, cfg)  # noqa: B023
            ms = timed(fn, f"prefill {length} {cfg}")
            if ms is not None:
                results["prefill"].append(dict(length=length, **cfg, TFLOPs=flops / ms / 1e9))
                print(json.dumps(results["prefill"][-1]), flush=True)
    return results


def timed(fn, label: str) -> float | None:
    try:
        return graph_time(fn)
    except Exception as e:  # a config may exceed shared memory or registers
        print(label, "failed:", type(e).__name__, str(e)[:200], flush=True)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--prefill-tokens", type=int, default=16384, help="tokens per prefill batch")
    parser.add_argument(
        "--sweep", choices=["decode", "prefill", "all"], help="first time alternative tile configs"
    )
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    args = parser.parse_args()

    gen = torch.Generator(device="cuda").manual_seed(0)
    result = machine_info(sys.argv)
    print(json.dumps(result), flush=True)
    if args.sweep:
        result["sweep"] = sweep(args.sweep, gen)
    copy_gbps = copy_bandwidth()
    result["copy_GBps"] = copy_gbps
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)

    result["decode"] = []
    for batch in args.batches:
        for context in args.contexts:
            row = bench_decode(batch, context, copy_gbps, gen)
            torch.cuda.empty_cache()
            if row is None:
                print(f"decode batch {batch} context {context}: skipped (memory)", flush=True)
                continue
            result["decode"].append(row)
            print(json.dumps(row), flush=True)
    result["prefill"] = []
    for length in args.prefill_lengths:
        row = bench_prefill(length, args.prefill_tokens, gen)
        torch.cuda.empty_cache()
        result["prefill"].append(row)
        print(json.dumps(row), flush=True)

    targeted = [r for r in result["decode"] if r["batch"] >= 8 and r["context"] >= 4096]
    decode_ok = all(r["frac_of_copy"] >= 0.8 for r in targeted)
    prefill_ok = all(r["frac_of_sdpa"] >= 0.7 for r in result["prefill"])
    result["targets"] = dict(decode_80pct_of_copy=decode_ok, prefill_70pct_of_sdpa=prefill_ok)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s; decode (bf16, 32q/8kv heads, d128, block 16):")
    head = ("batch", "ctx", "splits", "layers", "us", "GB/s", "%copy", "1-call us", "eager us", "sdpa us")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (6, 6, 6, 6, 9, 7, 6, 9, 9, 9))) + " sdpa GB/s")
    for r in result["decode"]:
        sdpa = f"{r['sdpa_us']:9.1f} {r['sdpa_GBps']:9.0f}" if "sdpa_GBps" in r else f"{'-':>9} {'-':>9}"
        print(
            f"{r['batch']:>6} {r['context']:>6} {r['num_splits']:>6} {r['layers']:>6} {r['triton_us']:9.1f} "
            f"{r['triton_GBps']:7.0f} {100 * r['frac_of_copy']:5.0f}% {r['single_us']:9.1f} "
            f"{r['eager_us']:9.1f} {sdpa}"
        )
    print(f"prefill (causal, {args.prefill_tokens} tokens per batch):")
    print(f"{'len':>6} {'batch':>6} {'TFLOP/s':>8} {'sdpa':>8} {'ratio':>6}")
    for r in result["prefill"]:
        print(
            f"{r['length']:>6} {r['batch']:>6} {r['triton_TFLOPs']:8.1f} {r['sdpa_TFLOPs']:8.1f} "
            f"{r['frac_of_sdpa']:6.2f}"
        )
    print("targets:", result["targets"])


if __name__ == "__main__":
    main()
