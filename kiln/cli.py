"""The ``kiln`` command line.

    kiln bench throughput  --model llama-8b --num-prompts 1000 --input-len 256 --output-len 256 [--compare hf]
    kiln bench latency     --model llama-1b --batch-sizes 1,8,64 [--compare hf]
    kiln bench compile     --model llama-1b                       (cold vs warm start-up)
    kiln bench sweep       --model llama-1b --configs benchmarks/sweep_configs.json
    kiln bench report      --results-dir benchmarks/results       (markdown tables of saved results)
    kiln compile <model> [--config JSON] [--engine-args JSON] [--check]   (fill the compile cache)

Every run writes ``bench_<name>[_<tag>].json`` (machine, versions, command, configuration, results)
into ``--output-dir``; latency, compile and sweep also write PNG plots, sweep a markdown table.
"""

from __future__ import annotations

import argparse
import sys

_BENCHES = {
    "throughput": "offline throughput: N prompts, requests/s, tokens/s, peak memory",
    "latency": "TTFT, TPOT and end-to-end latency per batch size, with percentiles",
    "compile": "start-up time, cold vs warm compile caches, per compile stage",
    "sweep": "one workload under each of a list of compilation configs: table and plots",
    "report": "markdown tables from the bench_*.json files of a results directory",
}


def build_parser() -> argparse.ArgumentParser:
    from kiln.bench import compile as compile_bench
    from kiln.bench import latency, report, sweep, throughput
    from kiln.compiler import precompile

    parser = argparse.ArgumentParser(prog="kiln", description="kiln: offline LLM inference tools")
    sub = parser.add_subparsers(dest="command", required=True)
    fill = sub.add_parser(
        "compile",
        help="fill the compile cache ahead of time (one engine start with these settings)",
        description=precompile.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    precompile.add_args(fill)
    fill.set_defaults(func=precompile.run)
    bench = sub.add_parser(
        "bench",
        help="benchmarks and compilation-config tuning",
        description="Benchmarks (random weights for named shapes; see --model).",
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    modules = {
        "throughput": throughput,
        "latency": latency,
        "compile": compile_bench,
        "sweep": sweep,
        "report": report,
    }
    for name, module in modules.items():
        p = bench_sub.add_parser(
            name,
            help=_BENCHES[name],
            description=_BENCHES[name],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_args(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(args_list)
    status = args.func(args, argv=["kiln", *args_list])
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
