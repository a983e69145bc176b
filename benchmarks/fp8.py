"""bf16 vs fp8 weights (and an fp8 KV cache): batch-1 TPOT and offline throughput, same run, same GPU.

    python benchmarks/fp8.py [--models llama-1b,llama-8b] [--variants bf16,fp8,fp8-kv8]
                             [--parts latency,throughput] [--output-dir benchmarks/results]

For each model (named shapes get random weights, quantized at load for the fp8 variants) and variant
it runs, each in its own process, ``kiln bench latency --batch-sizes 1`` (prompt 128, 256 new tokens,
three timed iterations) and ``kiln bench throughput`` (1000 prompts of 256 tokens, 256 new tokens),
leaving their ``bench_latency_fp8_<model>_<variant>.json`` / ``bench_throughput_fp8_<model>_<variant>.json``
in the output directory, then writes ``bench_fp8_<model>.json``: batch-1 TPOT (mean, and the weight-read
roofline of the variant), total tokens/s, and each fp8 variant's ratio to bf16 (a later call with other
``--parts`` or ``--variants`` adds to the same file). Variants:

- ``bf16``: the bf16 model;
- ``fp8``: ``quantization="fp8"`` (per-channel fp8 weights, per-token fp8 activations, ``torch._scaled_mm``);
- ``fp8-kv8``: ``quantization="fp8"`` and ``kv_cache_dtype="fp8"``;
- ``kv8``: the bf16 model with ``kv_cache_dtype="fp8"``.

Any further argument goes to every ``kiln bench`` call (e.g. ``-cc '{"compile_sizes": [1]}'``);
``--latency-args`` / ``--throughput-args`` (one quoted string) go to that part's calls only, after its
workload above, so they can shrink it (e.g. ``--throughput-args "--num-prompts 4 --output-len 4"`` for
a CPU smoke run on the ``tiny`` shape).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kiln.bench import env  # noqa: E402

VARIANTS = {
    "bf16": [],
    "fp8": ["--quantization", "fp8"],
    "fp8-kv8": ["--quantization", "fp8", "--kv-cache-dtype", "fp8"],
    "kv8": ["--kv-cache-dtype", "fp8"],
}
PARTS = {
    "latency": ["--batch-sizes", "1", "--input-len", "128", "--output-len", "256", "--num-iters", "3"],
    "throughput": ["--num-prompts", "1000", "--input-len", "256", "--output-len", "256"],
}


def run_part(part, model, variant, output_dir, extra, part_extra=()) -> dict | None:
    tag = f"fp8_{os.path.basename(model.rstrip('/'))}_{variant}"
    cmd = [sys.executable, "-m", "kiln.cli", "bench", part, "--model", model, "--dtype", "bfloat16"]
    cmd += [*PARTS[part], *part_extra, *VARIANTS[variant], "--tag", tag, "--output-dir", output_dir]
    cmd += ["--no-progress", *extra]
    print("+", " ".join(cmd), flush=True)
    child_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if subprocess.run(cmd, env=child_env).returncode != 0:
        return None
    with open(os.path.join(output_dir, f"bench_{part}_{tag}.json")) as f:
        return json.load(f)["results"]


def summarize(part: str, results: dict) -> dict:
    kiln = results["kiln"]
    if part == "latency":
        row = kiln["batches"][0]
        return {"tpot_ms": row["tpot_s"]["mean"] * 1e3, "roofline_tpot_ms": kiln["roofline"]["tpot_s"] * 1e3}
    keys = ("total_tokens_per_s", "output_tokens_per_s", "requests_per_s")
    row = {k: kiln[k] for k in keys if k in kiln}
    row["kv_cache_tokens"] = kiln["memory"].get("kv_cache_tokens")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-1b,llama-8b")
    parser.add_argument("--variants", default="bf16,fp8,fp8-kv8")
    parser.add_argument("--parts", default="latency,throughput")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    for part in PARTS:
        parser.add_argument(f"--{part}-args", default="", help=f"extra arguments of the {part} calls only")
    args, extra = parser.parse_known_args(argv)
    variants, parts = args.variants.split(","), args.parts.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown variants/parts {unknown}; variants: {list(VARIANTS)}, parts: {list(PARTS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    status = 0
    for model in args.models.split(","):
        name = os.path.basename(model.rstrip("/"))
        path = os.path.join(args.output_dir, f"bench_fp8_{name}.json")
        summary = env.collect(config={**vars(args), "model": model, "extra_args": extra})
        summary["benchmark"] = "fp8"
        summary["variants"] = {}
        if os.path.isfile(path):  # an earlier call's other parts or variants are kept
            with open(path) as f:
                summary["variants"] = json.load(f).get("variants", {})
        for variant in variants:
            row = summary["variants"].setdefault(variant, {})
            for part in parts:
                part_extra = shlex.split(getattr(args, f"{part}_args"))
                results = run_part(part, model, variant, args.output_dir, extra, part_extra)
                row.update(summarize(part, results) if results else {f"{part}_error": "run failed"})
                status |= results is None
        base = summary["variants"].get("bf16", {})
        for row in summary["variants"].values():
            if base.get("total_tokens_per_s") and row.get("total_tokens_per_s"):
                row["throughput_over_bf16"] = row["total_tokens_per_s"] / base["total_tokens_per_s"]
            if base.get("tpot_ms") and row.get("tpot_ms"):
                row["tpot_over_bf16"] = row["tpot_ms"] / base["tpot_ms"]
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(json.dumps(summary, indent=2))
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
