"""Batch-1 decode: TPOT of three runs and the GPU time of every kernel per decode step, for one shape.

    python benchmarks/decode_kernels.py --model llama-8b -cc '{"compile_sizes": [1]}'

Starts one LLM (random weights of the named shape), decodes 256 tokens after a 128-token prompt three
times (TPOT from the request metrics), then profiles 64 decode steps with ``torch.profiler`` and prints
the device time per step of each kernel, largest first, with the total device-busy time per step. The
difference between TPOT and busy time is device idle time. With ``--launch-info`` each row is one launch
configuration (grid, block, registers per thread, shared memory; from the profiler's trace), which tells
whether two processes ran the same kernels with the same configs. Needs CUDA.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.bench.shapes import write_shape_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b", help="named shape (llama-1b, llama-8b, qwen3-0.6b)")
    parser.add_argument("-cc", "--compilation-config", default="{}", help="CompilationConfig as JSON")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--launch-info", action="store_true", help="one row per kernel and launch config")
    parser.add_argument("--output", help="write TPOT, start-up and the rows as JSON here")
    args = parser.parse_args()

    cc = json.loads(args.compilation_config)
    t0 = time.perf_counter()
    llm = LLM(
        write_shape_dir(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        compilation_config=cc or None,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    startup = time.perf_counter() - t0
    prompt = {"prompt_token_ids": list(range(100, 228))}
    params = SamplingParams(temperature=args.temperature, max_tokens=256, ignore_eos=True, detokenize=False)
    llm.generate([prompt], params, use_tqdm=False)
    tpots = []
    for _ in range(3):
        metrics = llm.generate([prompt], params, use_tqdm=False)[0].metrics
        tpots.append((metrics.finished_time - metrics.first_token_time) / 255 * 1e3)
    print(f"{args.model} {cc} start-up {startup:.1f} s; TPOT ms: {', '.join(f'{t:.3f}' for t in tpots)}")

    short = SamplingParams(
        temperature=args.temperature, max_tokens=args.steps + 1, ignore_eos=True, detokenize=False
    )
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], short, use_tqdm=False)
        torch.cuda.synchronize()
    if args.launch_info:
        rows = _launch_rows(prof)
    else:
        events = prof.key_averages()
        rows = [(e.key, e.count, e.self_device_time_total) for e in events if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    busy = sum(r[2] for r in rows) / args.steps
    print(f"device busy {busy:.1f} us per step (the prompt's prefill spread over the {args.steps} steps)")
    for name, count, total_us in rows[: args.top]:
        print(f"{total_us / args.steps:9.2f} us/step  {count / args.steps:6.2f}/step  {name[:150]}")
    if args.output:
        record = {"command": " ".join(sys.argv), "startup_s": startup, "tpot_ms": tpots, "rows": rows}
        with open(args.output, "w") as f:
            json.dump(record, f)


def _launch_rows(prof) -> list[tuple[str, int, float]]:
    """(kernel name with its grid, block, registers and shared memory, launches, total us) from the trace."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("cat") != "kernel":
            continue
        a = event.get("args", {})
        key = (
            f"grid={a.get('grid')} block={a.get('block')} regs={a.get('registers per thread')} "
            f"smem={a.get('shared memory')} {event['name'][:90]}"
        )
        totals[key][0] += 1
        totals[key][1] += event.get("dur", 0)
    return [(key, n, us) for key, (n, us) in totals.items()]


if __name__ == "__main__":
    main()
