"""Small-batch fp8 products of a model shape: kiln's weight-only fp8 GEMV vs the W8A8 path, in CUDA graphs.

    python benchmarks/fp8_gemv.py --model llama-1b [--rows 1,2,4] [--sweep] [--output FILE]

For each projection of one decoder layer (qkv, o, gate/up, down) and each row count it cycles through
enough copies of the weight to outrun the L2 cache (as a stack of layers does), replays the calls in one
CUDA graph and reports device time per call and the weight bandwidth of: ``kiln::fp8_gemv`` (config of
``fp8_gemv_config``; with ``--sweep`` every config of the grid, best first), ``fp8_linear``'s W8A8 path
(per-token activation quantization, then ``torch._scaled_mm``), and the bf16 weight with cuBLAS
(``F.linear``). Also the largest difference of the GEMV from its torch reference. Needs CUDA.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gemv import graph_time, parser_for, print_sweep, products, sweep_configs, write_results  # noqa: E402  (benchmarks/gemv.py)

from kiln.bench.shapes import SHAPES  # noqa: E402
from kiln.ops.fp8_gemv import MAX_ROWS, fp8_gemv, fp8_gemv_ref  # noqa: E402
from kiln.ops.triton_fp8_gemv import fp8_gemv_config, fp8_gemv_triton  # noqa: E402
from kiln.quant.fp8 import fp8_linear, quantize_per_channel  # noqa: E402

GRID = {"block_n": (1, 2, 4, 8), "block_k": (512, 1024, 2048, 4096), "warps": (2, 4, 8)}


def bench_product(name: str, n: int, k: int, m: int, sweep: bool) -> dict:
    dev = "cuda"
    copies = max(2, -(-(256 << 20) // (n * k)))
    weights = [quantize_per_channel(torch.randn(n, k, device=dev) * 0.02) for _ in range(copies)]
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    w0, s0 = weights[0]
    err = (fp8_gemv(x, w0, s0, None).float() - fp8_gemv_ref(x, w0, s0).float()).abs().max()
    row = {"product": name, "n": n, "k": k, "rows": m, "copies": copies, "max_abs_err_vs_ref": err.item()}

    def timing(fn, weight_bytes, reps=20) -> dict:
        t = graph_time(fn, copies, reps)
        return {"us": t * 1e6, "GBps": weight_bytes / t / 1e9}

    row["kiln_fp8_gemv"] = {
        "config": fp8_gemv_config(n, k, m),
        **timing(lambda j: fp8_gemv(x, *weights[j], None), n * k),
    }
    row["w8a8_scaled_mm"] = timing(lambda j: fp8_linear(x, *weights[j]), n * k)
    del weights
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(copies // 2 + 1)]
    copies_bf16 = len(bf16)
    t = graph_time(lambda j: F.linear(x, bf16[j]), copies_bf16)
    row["bf16_cublas"] = {"us": t * 1e6, "GBps": n * k * 2 / t / 1e9}
    bf16.clear()
    if not sweep:
        return row
    weights = [quantize_per_channel(torch.randn(n, k, device=dev) * 0.02) for _ in range(copies)]
    row["sweep"] = sweep_configs(
        name,
        GRID,
        lambda c: timing(lambda j: fp8_gemv_triton(x, *weights[j], None, config=c), n * k, reps=10),
    )
    return row


def main() -> None:
    parser = parser_for(__doc__, "llama-1b")
    parser.add_argument("--rows", default="1,2,4", help=f"activation rows, each 1 to {MAX_ROWS}")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.model not in SHAPES:
        parser.error(f"--model: unknown shape {args.model!r}; one of {sorted(SHAPES)}")
    if any(not 1 <= r <= MAX_ROWS for r in rows):
        parser.error(f"--rows: each must be 1 to {MAX_ROWS}, got {args.rows!r}")
    results = []
    for name, (n, k, _) in products(SHAPES[args.model]).items():
        for m in rows:
            row = bench_product(name, n, k, m, args.sweep)
            results.append(row)
            g, w8, b = row["kiln_fp8_gemv"], row["w8a8_scaled_mm"], row["bf16_cublas"]
            print(
                f"{args.model} {name:20s} {n}x{k} M={m}: fp8 GEMV {g['config']} {g['us']:7.2f} us"
                f" {g['GBps']:5.0f} GB/s | W8A8 _scaled_mm {w8['us']:7.2f} us {w8['GBps']:5.0f} GB/s"
                f" | bf16 cuBLAS {b['us']:7.2f} us {b['GBps']:5.0f} GB/s"
                f" | max abs err {row['max_abs_err_vs_ref']:.2e}",
                flush=True,
            )
            print_sweep(row)
    write_results(args, "fp8_gemv", results)


if __name__ == "__main__":
    main()
