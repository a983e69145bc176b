"""LoRA serving cost on a model shape: decode TPOT with adapters vs the base model, and swap-in time.

    python benchmarks/lora.py --model llama-8b [--rank 16] [--output-dir benchmarks/results]

Random rank-``--rank`` adapters on all seven projections (dummy base weights). In one process:

* base: ``LLM`` without LoRA, decode batches of 64 and 1;
* lora: ``LLM(enable_lora=True, max_loras=4)``, batch 64 with 4 distinct adapters (16 requests each),
  batch 64 of base-model requests on the same engine, batch 1 with one adapter and batch 1 without;
* swap-in: one adapter copied from the CPU cache into a device slot (median of ``--swap-reps``), and
  reading + checking an adapter directory from disk.

With ``--profile``, one more batch-1 run on each engine (``profile``) under ``torch.profiler``: the
device time per decode step of every kernel (top ones by name, the LoRA kernels' sum, all kernels'
sum) against the step's wall time, which says whether LoRA's batch-1 cost is its kernels' time or
the gaps around them.

TPOT is the median over requests and iterations; the ratios are lora / base (``ratio_batch1_base_request``:
a base-model request on the LoRA engine). ``lora_kernels_per_step``: the LoRA kernels a decode step
launches at batch 1 and 64. Per-kernel times: ``benchmarks/lora_kernels.py``. Targets (recorded, not
asserted): batch 64 with 4 adapters <= 1.3x, batch 1 with one adapter <= 1.15x. Writes
``bench_lora_<model>[_<tag>].json`` with GPU name, versions and the command. Needs CUDA for meaningful
numbers (runs anywhere).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln.bench import common  # noqa: E402
from kiln.bench.lora_adapters import write_random_adapter  # noqa: E402
from kiln.bench.shapes import resolve_model  # noqa: E402

TARGETS = {"batch64_4_adapters": 1.3, "batch1_1_adapter": 1.15}


LORA_KERNEL_MARKS = ("lora", "_fused_rows_kernel", "_shrink_split_kernel", "_expand_split_kernel")


def profile_batch1(llm, prompt, lora, steps: int = 64, top: int = 12) -> dict:
    """Kernel device time per decode step of one batch-1 request of ``steps`` tokens (``torch.profiler``;
    without CUDA the ops' own CPU time, which only exercises this)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kiln import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, detokenize=False)
    req = [{"prompt_token_ids": prompt}]
    llm.generate(req, params, lora_request=lora, use_tqdm=False)  # warm
    llm.reset_prefix_cache()
    try:
        common.sync()
        start = time.perf_counter()
        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            llm.generate(req, params, lora_request=lora, use_tqdm=False)
            common.sync()
        wall = time.perf_counter() - start
    except Exception as e:  # a profiler that cannot trace here: say so in the results
        return {"error": repr(e)}
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0 and e.key and not e.key.startswith("cuda"):
            kernels.append((e.key, us / steps, e.count / steps))
    kernels.sort(key=lambda k: -k[1])
    lora_us = sum(us for name, us, _ in kernels if any(m in name for m in LORA_KERNEL_MARKS))
    return {
        "steps": steps,
        "wall_us_per_step": wall * 1e6 / steps,
        "kernel_us_per_step": sum(us for _, us, _ in kernels),
        "lora_kernel_us_per_step": lora_us,
        "kernels_per_step": sum(n for _, _, n in kernels),
        "top_kernels": [{"name": n[:120], "us_per_step": us, "per_step": c} for n, us, c in kernels[:top]],
    }


def tpot(llm, prompts, output_len, loras, iters):
    from kiln import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(reqs, params, lora_request=loras, use_tqdm=False)  # warm-up
    values = []
    for _ in range(iters):
        llm.reset_prefix_cache()
        common.sync()
        outs = llm.generate(reqs, params, lora_request=loras, use_tqdm=False)
        values += common.request_latencies(outs)["tpot"]
    return statistics.median(values)


def kernels_per_step(manager) -> dict:
    """The LoRA kernels a decode step launches on the GPU at batch 1 and 64 (all layers): one a
    projection whose weight carries the A table (``LoRALinear.stacked``), its plan's otherwise."""
    from kiln.ops.triton_lora import lora_kernels

    return {
        str(t): sum(
            1
            if w.stacked
            else lora_kernels(t, w.lora_a.shape[3], w.lora_a.shape[2], w.out_features, len(w.slice_sizes))
            for w in manager.wrappers.values()
        )
        for t in (1, 64)
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="llama-8b", help="a named shape (llama-8b, llama-1b, ...) or a model dir"
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--swap-reps", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None)
    p.add_argument(
        "--profile", action="store_true", help="kernel times per batch-1 decode step, both engines"
    )
    args = p.parse_args(argv)

    import torch

    from kiln import LLM, LoRARequest

    source = resolve_model(args.model)
    tmp = tempfile.mkdtemp(prefix="kiln-lora-bench-")
    adapters = [
        LoRARequest(
            f"random-{i}",
            i + 1,
            write_random_adapter(os.path.join(tmp, f"a{i}"), source.config, args.rank, seed=i),
        )
        for i in range(5)
    ]
    gen = torch.Generator().manual_seed(0)
    vocab = source.vocab_size
    prompts = [
        torch.randint(min(1000, vocab // 4), vocab, (args.input_len,), generator=gen).tolist()
        for _ in range(64)
    ]
    kw = dict(
        model=source.path,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_num_seqs=64,
        max_model_len=args.input_len + args.output_len + 16,
    )
    results, startup = {}, {}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup["base_s"] = time.perf_counter() - t0
    results["base_batch64_tpot_s"] = tpot(llm, prompts, args.output_len, None, args.num_iters)
    results["base_batch1_tpot_s"] = tpot(llm, prompts[:1], args.output_len, None, args.num_iters)
    profiles = {}
    if args.profile:
        profiles["base_batch1"] = profile_batch1(llm, prompts[0], None)
    common.free_llm(llm)

    t0 = time.perf_counter()
    llm = LLM(**kw, enable_lora=True, max_loras=4, max_lora_rank=args.rank, max_cpu_loras=5)
    kernels = kernels_per_step(llm.llm_engine.lora)
    startup["lora_s"] = time.perf_counter() - t0
    mixed = [adapters[i // 16] for i in range(64)]
    results["lora_batch64_4_adapters_tpot_s"] = tpot(llm, prompts, args.output_len, mixed, args.num_iters)
    results["lora_batch64_base_requests_tpot_s"] = tpot(llm, prompts, args.output_len, None, args.num_iters)
    results["lora_batch1_1_adapter_tpot_s"] = tpot(
        llm, prompts[:1], args.output_len, adapters[0], args.num_iters
    )
    results["lora_batch1_base_request_tpot_s"] = tpot(llm, prompts[:1], args.output_len, None, args.num_iters)
    if args.profile:
        profiles["lora_batch1_1_adapter"] = profile_batch1(llm, prompts[0], adapters[0])
        results["profile"] = profiles

    manager = llm.llm_engine.lora
    t0 = time.perf_counter()
    fresh = manager.load(adapters[4])  # not loaded before: read from disk, checked, laid out (pinned)
    results["adapter_load_from_disk_s"] = time.perf_counter() - t0
    swaps = []
    for _ in range(args.swap_reps):
        common.sync()
        t0 = time.perf_counter()
        manager.swap_in(0, fresh)
        common.sync()
        swaps.append(time.perf_counter() - t0)
    results["swap_in_s"] = statistics.median(swaps)
    results["adapter_bytes"] = sum(
        a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in fresh.weights.values()
    )
    results["recompilations"] = llm.compile_report().recompilations
    common.free_llm(llm)

    results["ratio_batch64_4_adapters"] = (
        results["lora_batch64_4_adapters_tpot_s"] / results["base_batch64_tpot_s"]
    )
    results["ratio_batch1_1_adapter"] = (
        results["lora_batch1_1_adapter_tpot_s"] / results["base_batch1_tpot_s"]
    )
    results["ratio_batch1_base_request"] = (
        results["lora_batch1_base_request_tpot_s"] / results["base_batch1_tpot_s"]
    )
    results["lora_kernels_per_step"] = kernels
    results["targets"] = {k: {"max_ratio": v, "met": results[f"ratio_{k}"] <= v} for k, v in TARGETS.items()}
    results["startup"] = startup
    config = {k: getattr(args, k) for k in vars(args)} | {"model": source.describe()}
    name = os.path.basename(args.model.rstrip("/"))  # a named shape, or a model dir's name
    path = common.write_result(args, f"lora_{name}", config, results, argv)
    for key, value in results.items():
        print(f"{key}: {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
