"""Decode latency per batch size next to HF transformers and the HBM roofline, for the named shapes.

    python benchmarks/latency.py [--models llama-1b,llama-8b] [--output-dir DIR] [kiln bench latency args ...]

Runs ``kiln bench latency`` once per model on the workload of the CUDA-graph benchmarks: prompts of 128
tokens, 256 new tokens, batch sizes 1, 8, 32 and 128, three timed iterations, HF eager and HF static
cache + ``torch.compile`` in the same run (``--compare hf``). Each report gives TTFT, TPOT and end-to-end
percentiles, batch-1 TPOT as a share of the roofline (weight bytes / measured read bandwidth) and kiln/HF
ratios; JSON and a TPOT plot go to the output directory. Any further argument is passed on and wins over
these defaults, e.g. ``-cc '{"compile_sizes": [1]}'`` for the batch-1 latency setting or
``--batch-sizes 1``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln.cli import main as kiln_main  # noqa: E402

DEFAULTS = ["--batch-sizes", "1,8,32,128", "--input-len", "128", "--output-len", "256", "--num-iters", "3"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="llama-1b,llama-8b", help="comma-separated named shapes or model dirs"
    )
    parser.add_argument("--output-dir", default="benchmarks/results")
    args, extra = parser.parse_known_args(argv)
    for model in args.models.split(","):
        tag = os.path.basename(model.rstrip("/"))
        command = ["bench", "latency", "--model", model, *DEFAULTS, "--compare", "hf", "--tag", tag]
        status = kiln_main([*command, "--output-dir", args.output_dir, *extra])
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
