"""GPU memory around LLM.sleep / wake_up, and greedy identity across them. The memory needs CUDA.

    python benchmarks/sleep_mode.py --model llama-8b [--level 1] [--out results/sleep_h200.json]

Starts an LLM on a named shape (random weights, ``load_format="dummy"``), runs a greedy batch, then for
the chosen level: device memory in use (``cudaMemGetInfo``: everything this process holds, CUDA
context included) awake, after ``sleep`` and after ``wake_up``; the seconds each took (wake-up includes
re-capturing the CUDA graphs); whether the same greedy batch gives the same tokens after waking; and
the fraction of the awake footprint still held while asleep (target: under 10%). Without CUDA (a CPU
smoke run on the ``tiny`` shape) the memory fields are ``null``; times and greedy identity are measured.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.bench import env  # noqa: E402
from kiln.bench.common import emit_result  # noqa: E402
from kiln.bench.shapes import shape_config, write_shape_dir  # noqa: E402
from kiln.bench.workload import patterned_ids  # noqa: E402


def used_bytes() -> int | None:
    """Device memory in use by this process (``None`` without CUDA)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--level", type=int, default=1, choices=(1, 2))
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    baseline = used_bytes()  # the CUDA context alone
    start = time.perf_counter()
    llm = LLM(
        write_shape_dir(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=0.9,
    )
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, detokenize=False)
    vocab = shape_config(args.model)["vocab_size"]
    prompts = [{"prompt_token_ids": patterned_ids(i, 32 + 8 * i, vocab)} for i in range(16)]
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    awake = used_bytes()
    t = time.perf_counter()
    llm.sleep(level=args.level)
    sleep_s = time.perf_counter() - t
    asleep = used_bytes()
    t = time.perf_counter()
    llm.wake_up()
    wake_s = time.perf_counter() - t
    woken = used_bytes()
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    doc = env.collect(config=vars(args))
    doc["benchmark"] = "sleep_mode"
    doc["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    doc["results"] = {
        "startup_s": round(startup, 2),
        "context_only_gib": gib(baseline),
        "awake_gib": gib(awake),
        "asleep_gib": gib(asleep),
        "after_wake_gib": gib(woken),
        "asleep_fraction_of_awake": None if awake is None else round(asleep / awake, 4),
        "sleep_s": round(sleep_s, 2),
        "wake_up_s": round(wake_s, 2),
        "graph_capture_s": round(llm.compile_report().graph_capture_s, 2),
        "greedy_identical": before == after,
    }
    emit_result(doc, args.out)


if __name__ == "__main__":
    main()
