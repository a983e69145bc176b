"""``kiln bench latency``: one batch at a time for each batch size; TTFT, TPOT and end-to-end latency
with percentiles over requests and iterations."""

from __future__ import annotations

import argparse
import time

import torch

from kiln.bench import common, hf_compare, plots, workload
from kiln.bench.limits import read_bandwidth
from kiln.runtime.engine_args import default_batch_limits


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    g = p.add_argument_group("workload")
    g.add_argument(
        "--batch-sizes", type=common.int_list, default=[1, 8, 64], help="comma-separated (default: 1,8,64)"
    )
    g.add_argument("--input-len", type=int, default=256)
    g.add_argument("--output-len", type=int, default=256)
    g.add_argument("--num-iters", type=int, default=3, help="timed iterations per batch size")
    g.add_argument("--num-iters-warmup", type=int, default=1)
    common.add_output_args(p, compare=True)


def measure_batch(
    llm,
    prompts: list[list[int]],
    output_len: int,
    num_iters: int,
    num_warmup: int,
    show_progress: bool = False,
) -> dict:
    """Generate the batch ``num_warmup + num_iters`` times; statistics over the timed iterations."""
    reqs = [{"prompt_token_ids": list(p)} for p in prompts]
    params = workload.sampling_params(output_len)
    for _ in range(num_warmup):
        llm.generate(reqs, params, use_tqdm=False)
        llm.reset_prefix_cache()
    ttft, tpot, e2e, queue, batch = [], [], [], [], []
    for _ in common.progress(
        range(num_iters), disable=not show_progress, desc=f"batch {len(prompts)}", leave=False
    ):
        common.sync()
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        common.sync()
        batch.append(time.perf_counter() - t0)
        llm.reset_prefix_cache()  # each iteration prefills from scratch
        lat = common.request_latencies(outs)
        ttft += lat["ttft"]
        tpot += lat["tpot"]
        e2e += lat["e2e"]
        queue += lat["queue"]
    mean_batch = sum(batch) / len(batch)
    return {
        "batch_size": len(prompts),
        "ttft_s": common.percentiles(ttft),
        "tpot_s": common.percentiles(tpot),
        "e2e_s": common.percentiles(e2e),
        "queue_s": common.percentiles(queue),  # TTFT's part before the first step scheduled the request
        "batch_latency_s": common.percentiles(batch),
        "output_tokens_per_s": len(prompts) * output_len / mean_batch,
    }


def batch_prompts(args, source, batch_size: int) -> list[list[int]]:
    wl = workload.synthetic(
        batch_size, args.input_len, args.output_len, source.vocab_size, args.seed + batch_size
    )
    return [r.prompt_token_ids for r in wl.requests]


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    source = common.get_source(args)
    longest = args.input_len + args.output_len
    kwargs = common.engine_kwargs(args, source, longest)
    if args.max_num_seqs is None:  # the engine's default, or the largest batch where that is more
        seqs, _ = default_batch_limits(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        kwargs["max_num_seqs"] = max(seqs, max(args.batch_sizes))
    llm, startup = common.build_llm(kwargs)
    dtype, device = llm.config.dtype, llm.config.device
    roof = roofline(llm)
    rows = []
    for bs in common.progress(args.batch_sizes, disable=args.no_progress, desc="batch sizes"):
        rows.append(
            measure_batch(
                llm,
                batch_prompts(args, source, bs),
                args.output_len,
                args.num_iters,
                args.num_iters_warmup,
                not args.no_progress,
            )
        )
    results = {
        "kiln": {
            "startup_s": startup,
            "batches": rows,
            "memory": common.memory_report(llm),
            "compile_report": common.compile_report(llm),
            "roofline": roof,
        }
    }
    common.free_llm(llm)
    del llm
    if args.compare == "hf":
        results["hf"] = run_hf(args, source, dtype, device)
        results["ratio_kiln_over_hf"] = ratios(rows, results["hf"])
    config = {
        "model": source.describe(),
        "llm_kwargs": kwargs,
        "args": common.args_dict(args),
        "dtype": str(dtype),
        "workload": {
            "batch_sizes": args.batch_sizes,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_iters": args.num_iters,
            "num_iters_warmup": args.num_iters_warmup,
            "seed": args.seed,
        },
    }
    path = common.write_result(args, "latency", config, results, argv)
    series = {"kiln": [(r["batch_size"], r["tpot_s"]["mean"]) for r in rows]}
    for v in results.get("hf", []):
        series[f"HF {v['variant']}"] = [
            (b["batch_size"], b["tpot_s"]["mean"]) for b in v["batches"] if "error" not in b
        ]
    plot = plots.tpot_vs_batch(
        series,
        common.result_path(args, "latency_tpot", "png"),
        title=f"TPOT vs batch size ({source.spec}, in {args.input_len} / out {args.output_len})",
    )
    print_summary(results)
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    results["path"] = path
    results["plot"] = plot
    return results


def roofline(llm) -> dict:
    """Batch-1 decode floor: weight bytes a decode step reads (the input embedding table is not read,
    unless it doubles as the output projection) over the device's measured read bandwidth."""
    model = llm.llm_engine.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        emb = model.model.embed_tokens.weight
        weight_bytes -= emb.numel() * emb.element_size()
    bandwidth = read_bandwidth(llm.config.device)
    return {"weight_bytes": weight_bytes, "read_bandwidth_Bps": bandwidth, "tpot_s": weight_bytes / bandwidth}


def run_hf(args, source, dtype, device) -> list[dict]:
    out = []
    for variant in hf_compare.parse_variants(args.hf_variants):
        model = None
        batches = []
        try:
            model = hf_compare.build_model(source.config, dtype, device)
            for bs in args.batch_sizes:
                try:
                    r = hf_compare.latency(
                        model,
                        batch_prompts(args, source, bs),
                        args.output_len,
                        variant,
                        args.num_iters,
                        args.num_iters_warmup,
                    )
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"}
                r["batch_size"] = bs
                batches.append(r)
            out.append({"variant": variant, "batches": batches})
        except Exception as e:
            out.append({"variant": variant, "batches": batches, "error": f"{type(e).__name__}: {e}"})
        finally:
            del model
            common.free_llm(None)
    return out


def ratios(rows: list[dict], hf: list[dict]) -> dict:
    """kiln / HF of mean TTFT, TPOT and end-to-end latency per batch size (below 1: kiln is faster)."""
    out = {}
    for v in hf:
        per = {}
        for r, h in zip(rows, v["batches"]):
            if "error" in h:
                continue
            per[str(r["batch_size"])] = {
                m: (r[m]["mean"] / h[m]["mean"]) if h[m]["mean"] else None
                for m in ("ttft_s", "tpot_s", "e2e_s")
            }
        out[v["variant"]] = per
    return out


def _ms(x) -> str:
    return "n/a" if x is None else f"{x * 1000:.2f}"


def print_summary(results: dict) -> None:
    print("\nlatency (ms; mean / p50 / p99)")
    print(f"  kiln start-up {results['kiln']['startup_s']:.2f} s")
    roof = results["kiln"]["roofline"]
    print(
        f"  roofline: {roof['weight_bytes'] / 1e9:.2f} GB of weights per step at "
        f"{roof['read_bandwidth_Bps'] / 1e9:.0f} GB/s read = {_ms(roof['tpot_s'])} ms/token"
    )
    for r in results["kiln"]["batches"]:
        ttft = " / ".join(_ms(r["ttft_s"][k]) for k in ("mean", "p50", "p99"))
        tpot = " / ".join(_ms(r["tpot_s"][k]) for k in ("mean", "p50", "p99"))
        share = f"  ({roof['tpot_s'] / r['tpot_s']['mean']:.0%} of roofline)" if r["batch_size"] == 1 else ""
        e2e = _ms(r["e2e_s"]["mean"])
        print(f"  kiln batch {r['batch_size']:>4}: TTFT {ttft}  TPOT {tpot}  e2e {e2e}{share}")
    for v in results.get("hf", []):
        for b in v["batches"]:
            if "error" in b:
                print(f"  HF {v['variant']} batch {b['batch_size']}: failed: {b['error']}")
                continue
            ratio = results["ratio_kiln_over_hf"][v["variant"]].get(str(b["batch_size"]), {})
            tp = ratio.get("tpot_s")
            print(
                f"  HF {v['variant']} batch {b['batch_size']:>4}: TTFT {_ms(b['ttft_s']['mean'])}  "
                f"TPOT {_ms(b['tpot_s']['mean'])}  e2e {_ms(b['e2e_s']['mean'])}  "
                f"kiln/HF TPOT = {'n/a' if tp is None else f'{tp:.2f}'}"
            )
        if "error" in v:
            print(f"  HF {v['variant']}: failed: {v['error']}")
