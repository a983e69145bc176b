"""Where one throughput run's time goes: host (cProfile) and device (torch.profiler) side by side.

    python benchmarks/step_profile.py --model llama-1b --num-prompts 256 --input-len 256 --output-len 64 \
        --output-dir OUT [--tag base]

Uses only the public API and ``kiln.bench.shapes``, so it runs on any kiln tree (a before/after pair is
compared by running it once per tree). Writes ``step_profile_<tag>.txt``: wall time, the device's busy time
(union of kernel intervals) and its share of the wall, the top host functions by own time and the top device
kernels by total time. A run whose device is busy well under 100% of the wall is host-bound.
"""

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import time


def _busy_us(events) -> tuple[float, float]:
    """(union of device-kernel intervals, sum of kernel durations) in microseconds."""
    spans = []
    for e in events:
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
            start = e.time_range.start
            spans.append((start, start + e.time_range.elapsed_us()))
    spans.sort()
    union = total = 0.0
    cur_s = cur_e = None
    for s, e in spans:
        total += e - s
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                union += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        union += cur_e - cur_s
    return union, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--output-dir", default="bench_out")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--bench-workload", action="store_true", help="kiln bench's workload objects")
    ap.add_argument("--llm-kwargs", default="{}", help="JSON dict passed to LLM()")
    args = ap.parse_args()

    import json

    import torch

    from kiln import LLM
    from kiln.bench import workload
    from kiln.bench.shapes import resolve_model

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    src = resolve_model(args.model)
    kwargs = {
        "model": src.path,
        "max_model_len": args.input_len + args.output_len,
        "seed": 0,
        **json.loads(args.llm_kwargs),
    }
    if src.load_format != "auto":
        kwargs["load_format"] = src.load_format
    if not src.has_tokenizer:
        kwargs["skip_tokenizer_init"] = True
    llm = LLM(**kwargs)
    if args.bench_workload:  # exactly `kiln bench throughput`'s prompts and per-request params
        wl = workload.synthetic(args.num_prompts, args.input_len, args.output_len, src.vocab_size)
        prompts, sp = wl.prompts(), wl.sampling_params()
    else:
        rng = random.Random(0)
        vocab = src.vocab_size
        prompts = [
            {"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(args.input_len)]}
            for _ in range(args.num_prompts)
        ]
        sp = workload.sampling_params(args.output_len)  # one for all, as `kiln bench throughput` builds it
    llm.generate(prompts[:16], sp[:16] if isinstance(sp, list) else sp, use_tqdm=False)  # warm
    llm.reset_prefix_cache()

    sync()
    t0 = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    sync()
    plain_s = time.perf_counter() - t0

    llm.reset_prefix_cache()
    prof_host = cProfile.Profile()
    t0 = time.perf_counter()
    prof_host.enable()
    llm.generate(prompts, sp, use_tqdm=False)
    prof_host.disable()
    sync()
    cprofile_s = time.perf_counter() - t0

    llm.reset_prefix_cache()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof_dev:
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        sync()
        torch_prof_s = time.perf_counter() - t0
    union, total = _busy_us(prof_dev.events())

    out = io.StringIO()
    tokens = args.num_prompts * (args.input_len + args.output_len)
    print(f"tree: {os.path.dirname(os.path.dirname(__import__('kiln').__file__))}", file=out)
    print(f"command: {' '.join(sys.argv)}", file=out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}  torch {torch.__version__}", file=out)
    print(f"wall (plain): {plain_s:.3f} s = {tokens / plain_s:,.0f} total tok/s", file=out)
    print(f"wall (cProfile): {cprofile_s:.3f} s   wall (torch.profiler): {torch_prof_s:.3f} s", file=out)
    print(
        f"device busy (kernel union): {union / 1e6:.3f} s = {100 * union / 1e6 / torch_prof_s:.1f}% of the "
        f"profiled wall; kernel sum {total / 1e6:.3f} s",
        file=out,
    )
    print("\n== host: top functions by own time ==", file=out)
    s = io.StringIO()
    pstats.Stats(prof_host, stream=s).sort_stats("tottime").print_stats(45)
    print(s.getvalue(), file=out)
    print("== host: top functions by cumulative time ==", file=out)
    s = io.StringIO()
    pstats.Stats(prof_host, stream=s).sort_stats("cumulative").print_stats(45)
    print(s.getvalue(), file=out)
    print("== device: kernels ==", file=out)
    print(
        prof_dev.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70),
        file=out,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"step_profile_{args.tag}.txt")
    with open(path, "w") as f:
        f.write(out.getvalue())
    print(out.getvalue()[:1500])
    print("wrote", path)


if __name__ == "__main__":
    main()
