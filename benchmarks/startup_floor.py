"""What every start-up pays before kiln does anything: ``import torch``, the CUDA context, ``import kiln``.

    python benchmarks/startup_floor.py [--repeats 3] [--out results/startup_floor_h200.json]

Each repeat is a fresh interpreter that times, in order: ``import torch``; ``torch.cuda.init()`` and the
first device allocation (the CUDA context; skipped without CUDA); ``import kiln`` on top of torch; and,
with ``--model DIR``, ``safetensors`` reading every tensor of that checkpoint to the device (the weight
read alone, page cache permitting). The start-up timeline (``kiln bench compile``) folds the CUDA context
into ``weight_load`` and torch's import into ``import``: these figures say how much of a start-up target
is left for kiln's own phases on this machine. Medians over the repeats, every run in the JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln.bench import env  # noqa: E402
from kiln.bench.common import emit_result  # noqa: E402

CHILD = r"""
import glob, json, os, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
t2 = time.perf_counter()
import kiln  # noqa: F401
t3 = time.perf_counter()
read = None
if sys.argv[1]:
    from safetensors.torch import load_file
    for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors"))):
        load_file(f, device="cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.synchronize()
    read = time.perf_counter() - t3
print(json.dumps({"import_torch_s": t1 - t0, "cuda_context_s": (t2 - t1) if cuda else None,
                  "import_kiln_s": t3 - t2, "weight_read_s": read}))
"""

FIELDS = ("import_torch_s", "cuda_context_s", "import_kiln_s", "weight_read_s")


def one_run(model: str) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    environ = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model or ""], env=environ, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="", help="a safetensors checkpoint folder to read to the device")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    runs = [one_run(args.model) for _ in range(args.repeats)]
    median = {
        f: (None if runs[0][f] is None else round(statistics.median(r[f] for r in runs), 4)) for f in FIELDS
    }
    median["floor_s"] = round(sum(v for v in median.values() if v is not None), 4)
    doc = env.collect(config=vars(args))
    doc["benchmark"] = "startup_floor"
    doc["results"] = {"median": median, "runs": runs}
    emit_result(doc, args.out)


if __name__ == "__main__":
    main()
