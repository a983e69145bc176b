"""``kiln bench throughput``: offline generation of N prompts; requests/s, tokens/s and peak memory."""

from __future__ import annotations

import argparse
import time

from kiln.bench import common, hf_compare, workload


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--input-len", type=int, default=256)
    g.add_argument("--output-len", type=int, default=256)
    g.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="sample lengths uniformly in len*(1 -/+ ratio) (default: fixed lengths)",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="JSONL of {'prompt': ...} or {'prompt_token_ids': [...]}, optional 'output_len'",
    )
    g.add_argument(
        "--num-warmup-prompts", type=int, default=4, help="short requests run before timing (0: none)"
    )
    common.add_output_args(p, compare=True)


def make_workload(args: argparse.Namespace, source) -> workload.Workload:
    if args.dataset:
        tok = common.load_tokenizer(args, source)
        return workload.from_jsonl(
            args.dataset,
            source.vocab_size,
            args.output_len,
            tok,
            args.num_prompts if args.num_prompts else None,
            args.seed,
        )
    return workload.synthetic(
        args.num_prompts, args.input_len, args.output_len, source.vocab_size, args.seed, args.range_ratio
    )


def measure(llm, wl: workload.Workload, show_progress: bool, num_warmup: int = 4) -> dict:
    """Generate the whole workload once (after a short warm-up) and report rates."""
    if num_warmup > 0:
        warm = wl.requests[:num_warmup]
        llm.generate(
            [{"prompt_token_ids": list(r.prompt_token_ids)} for r in warm],
            [workload.sampling_params(min(4, r.output_len)) for r in warm],
            use_tqdm=False,
        )
        llm.reset_prefix_cache()
    common.reset_peak_memory()
    common.sync()
    t0 = time.perf_counter()
    outputs = llm.generate(wl.prompts(), wl.sampling_params(), use_tqdm=show_progress)
    common.sync()
    elapsed = time.perf_counter() - t0
    n_in = sum(len(o.prompt_token_ids) for o in outputs)
    n_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    lat = common.request_latencies(outputs)
    return {
        "num_requests": len(outputs),
        "num_input_tokens": n_in,
        "num_output_tokens": n_out,
        "elapsed_s": elapsed,
        **common.rates(len(outputs), n_in, n_out, elapsed),
        "ttft_s": common.percentiles(lat["ttft"]),
        "tpot_s": common.percentiles(lat["tpot"]),
        "e2e_s": common.percentiles(lat["e2e"]),
    }


def run_hf(args, source, wl, dtype, device, max_num_seqs: int) -> list[dict]:
    results = []
    batch = args.hf_batch_size or max_num_seqs
    for variant in hf_compare.parse_variants(args.hf_variants):
        model = None
        try:
            model = hf_compare.build_model(source.config, dtype, device)
            common.reset_peak_memory()
            r = hf_compare.throughput(model, wl, variant, batch, not args.no_progress)
            r["memory"] = common.memory_report()
        except Exception as e:  # keep kiln's numbers even if a baseline variant fails
            r = {"variant": variant, "error": f"{type(e).__name__}: {e}"}
        finally:
            del model
            common.free_llm(None)
        results.append(r)
    return results


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    source = common.get_source(args)
    wl = make_workload(args, source)
    kwargs = common.engine_kwargs(args, source, wl.max_total_len)
    llm, startup = common.build_llm(kwargs)
    dtype, device = llm.config.dtype, llm.config.device
    max_num_seqs = llm.config.max_num_seqs
    kv_elem = llm.llm_engine.worker.kv_cache_dtype.itemsize
    res = measure(llm, wl, not args.no_progress, args.num_warmup_prompts)
    res["startup_s"] = startup
    res["memory"] = common.memory_report(llm)
    res["compile_report"] = common.compile_report(llm)
    common.free_llm(llm)
    del llm
    res["limits"] = compute_limits(source.config, wl, res["elapsed_s"], device, dtype, kv_elem)
    results = {"kiln": res}
    if args.compare == "hf":
        hf = run_hf(args, source, wl, dtype, device, max_num_seqs)
        results["hf"] = hf
        results["ratio_kiln_over_hf"] = {
            r["variant"]: res["total_tokens_per_s"] / r["total_tokens_per_s"] for r in hf if "error" not in r
        }
    config = {
        "model": source.describe(),
        "workload": wl.description,
        "llm_kwargs": kwargs,
        "args": common.args_dict(args),
        "dtype": str(dtype),
    }
    path = common.write_result(args, "throughput", config, results, argv)
    print_summary(results, source, wl)
    print(f"wrote {path}")
    results["path"] = path
    return results


def compute_limits(
    config: dict, wl: workload.Workload, elapsed: float, device, dtype, kv_elem_bytes: int = 2
) -> dict | None:
    """The workload's model FLOPs (each request's forward over prompt + output - 1 tokens and one logits
    row per output token) as a rate, against a dense GEMM timed now on the GPU; and the floor of the run:
    those FLOPs at that rate plus the K/V bytes its decode steps read at the read bandwidth measured now
    (None off the GPU)."""
    from kiln.bench.limits import forward_flops, gemm_tflops, kv_read_bytes, read_bandwidth

    if device.type != "cuda":
        return None
    try:
        flops = sum(
            forward_flops(config, len(r.prompt_token_ids) + r.output_len - 1, 1, r.output_len)
            for r in wl.requests
        )
        kv = sum(
            kv_read_bytes(config, len(r.prompt_token_ids), r.output_len, kv_elem_bytes) for r in wl.requests
        )
    except KeyError:  # a config without the fields of a Llama-family model
        return None
    gemm = gemm_tflops(device, dtype)
    bandwidth = read_bandwidth(device)
    model = flops / elapsed / 1e12
    floor = flops / (gemm * 1e12) + kv / bandwidth
    return {
        "model_flops": flops,
        "model_tflops": model,
        "gemm_tflops": gemm,
        "fraction_of_gemm": model / gemm,
        "kv_read_bytes": kv,
        "read_bandwidth_Bps": bandwidth,
        "floor_s": floor,
        "fraction_of_floor": floor / elapsed,
    }


def print_summary(results: dict, source, wl) -> None:
    k = results["kiln"]
    print(
        f"\nthroughput  model={source.spec}  {len(wl)} requests, {wl.num_input_tokens} input / "
        f"{wl.num_output_tokens} output tokens"
    )
    print(
        f"  kiln: {k['requests_per_s']:.2f} req/s, input {k['input_tokens_per_s']:.1f} tok/s, "
        f"output {k['output_tokens_per_s']:.1f} tok/s, total {k['total_tokens_per_s']:.1f} tok/s "
        f"({k['elapsed_s']:.2f} s; start-up {k['startup_s']:.2f} s; "
        f"peak memory {common.fmt_bytes(k['memory']['peak_bytes'])})"
    )
    lim = k.get("limits")
    if lim:
        print(
            f"  model compute {lim['model_tflops']:.1f} TFLOP/s = {100 * lim['fraction_of_gemm']:.1f}% of a "
            f"dense GEMM timed in this run ({lim['gemm_tflops']:.1f} TFLOP/s)"
        )
        if "floor_s" in lim:
            kv_tb, bw_tb = lim["kv_read_bytes"] / 1e12, lim["read_bandwidth_Bps"] / 1e12
            print(
                f"  floor {lim['floor_s']:.2f} s (those FLOPs at that rate + {kv_tb:.2f} TB of K/V reads "
                f"at {bw_tb:.2f} TB/s): the run reached {100 * lim['fraction_of_floor']:.1f}% of that rate"
            )
    for r in results.get("hf", []):
        if "error" in r:
            print(f"  HF {r['variant']}: failed: {r['error']}")
            continue
        ratio = results["ratio_kiln_over_hf"][r["variant"]]
        rate = f"{r['requests_per_s']:.2f} req/s, total {r['total_tokens_per_s']:.1f} tok/s"
        where = f"{r['elapsed_s']:.2f} s, batch {r['batch_size']}"
        print(f"  HF {r['variant']}: {rate} ({where})  kiln/HF = {ratio:.2f}x")
