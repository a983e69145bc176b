"""Batch-1 products of a model shape: kiln's GEMV kernel per block-size config vs cuBLAS, in CUDA graphs.

    python benchmarks/gemv.py --model llama-8b [--sweep]

For each product of one decoder layer (qkv with its RMSNorm, o with the residual add, gate/up with its
RMSNorm, down with SiLU-mul and the residual add) it cycles through enough copies of the weight to
outrun the L2 cache (as a stack of layers does), replays the calls in one CUDA graph and reports device
time per call and the weight bandwidth: ``kiln::gemv`` with the config of ``gemv_config`` (and, with
``--sweep``, every config of the grid, best first), and cuBLAS ``F.linear`` with the same neighbours as
separate torch ops. Needs CUDA.
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from kiln.bench import env  # noqa: E402
from kiln.bench.common import save_result  # noqa: E402
from kiln.bench.shapes import SHAPES  # noqa: E402
from kiln.ops.gemv import gemv, gemv_ref  # noqa: E402
from kiln.ops.triton_gemv import _gemv_kernel, gemv_config  # noqa: E402

GRID = {"block_n": (1, 2, 4, 8), "block_k": (256, 512, 1024, 2048), "warps": (4, 8, 16)}


def products(shape: dict) -> dict:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    d = shape.get("head_dim") or h // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    return {
        "qkv+norm": (qkv, h, "norm"),
        "o+residual": (h, shape["num_attention_heads"] * d, "residual"),
        "gate_up+norm": (2 * i, h, "norm"),
        "down+silu+residual": (h, i, "silu"),
    }


def graph_time(fn, copies: int, reps: int = 20) -> float:
    """Device seconds per call of ``fn(j)``, j cycling over the copies, replayed in one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for j in range(copies):
            fn(j)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for j in range(copies):
            fn(j)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps / copies


def bench_product(name: str, n: int, k: int, kind: str, eps: float, sweep: bool) -> dict:
    dtype, dev = torch.bfloat16, "cuda"
    copies = max(2, -(-(256 << 20) // (n * k * 2)))
    ws = [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2 * k if kind == "silu" else k, dtype=dtype, device=dev)
    g = torch.randn(k, dtype=dtype, device=dev) if kind == "norm" else None
    r = torch.randn(1, n, dtype=dtype, device=dev) if kind != "norm" else None
    out = torch.empty(1, n, dtype=dtype, device=dev)
    silu, weight_bytes = kind == "silu", n * k * 2
    err = (gemv(x, ws[0], g, r, eps, silu).float() - gemv_ref(x, ws[0], g, r, eps, silu).float()).abs().max()
    row = {"product": name, "n": n, "k": k, "copies": copies, "max_abs_err_vs_torch": err.item()}

    def timing(fn, reps=20) -> dict:
        t = graph_time(fn, copies, reps)
        return {"us": t * 1e6, "GBps": weight_bytes / t / 1e9}

    config = gemv_config(n, k, kind in ("norm", "silu"))
    row["kiln"] = {"config": config, **timing(lambda j: gemv(x, ws[j], g, r, eps, silu))}
    row["cublas_and_torch_ops"] = timing(lambda j: gemv_ref(x, ws[j], g, r, eps, silu))
    if not sweep:
        return row

    def launcher(bn, bk, warps):
        def launch(j):
            _gemv_kernel[(triton.cdiv(n, bn),)](
                x, ws[j], x if g is None else g, out if r is None else r, out, n, k, ws[j].stride(0), eps,
                NORM=g is not None, SILU=silu, RESIDUAL=r is not None,
                BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
            )  # fmt: skip

        return launch

    row["sweep"] = sweep_configs(name, GRID, lambda config: timing(launcher(*config), reps=10))
    return row


def sweep_configs(name: str, grid: dict, time_config) -> list[dict]:
    """Every launch config of ``grid`` (the product of its values) timed by ``time_config(config)``,
    fastest first; a config that does not compile or launch is reported on stderr and left out."""
    timed = []
    for config in itertools.product(*grid.values()):
        try:
            timed.append({"config": config, **time_config(config)})
        except Exception as exc:
            print(f"  {name} {config}: {type(exc).__name__}", file=sys.stderr)
    return sorted(timed, key=lambda c: c["us"])


def parser_for(doc: str, default_model: str) -> argparse.ArgumentParser:
    """The kernel benchmarks' shared options: ``--model``, ``--sweep``, ``--output``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=default_model)
    parser.add_argument("--sweep", action="store_true", help="time every config of the grid")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser


def main() -> None:
    args = parser_for(__doc__, "llama-8b").parse_args()
    shape = SHAPES[args.model]
    results = []
    for name, (n, k, kind) in products(shape).items():
        row = bench_product(name, n, k, kind, shape.get("rms_norm_eps", 1e-5), args.sweep)
        results.append(row)
        kiln, cublas = row["kiln"], row["cublas_and_torch_ops"]
        print(
            f"{args.model} {name:20s} {n}x{k}: kiln {kiln['config']} {kiln['us']:7.2f} us"
            f" {kiln['GBps']:5.0f} GB/s"
            f" | cuBLAS + torch ops {cublas['us']:7.2f} us {cublas['GBps']:5.0f} GB/s"
            f" | max abs err {row['max_abs_err_vs_torch']:.2e}",
            flush=True,
        )
        print_sweep(row)
    write_results(args, "gemv", results)


def print_sweep(row: dict) -> None:
    """The six fastest launch configurations of a product's ``--sweep``."""
    for c in row.get("sweep", [])[:6]:
        print(f"    {c['config']} {c['us']:.2f} us {c['GBps']:.0f} GB/s")


def write_results(args, kind: str, results: list[dict]) -> None:
    doc = env.collect(config=vars(args))
    doc["benchmark"] = kind
    doc["results"] = results
    save_result(doc, args.output)


if __name__ == "__main__":
    main()
