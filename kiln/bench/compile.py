"""``kiln bench compile``: start-up cost, cold (empty compile caches) and warm (caches filled by the cold
run), each in a fresh process; time per stage from ``LLM.compile_report()`` where the engine offers it.

Each phase's result holds the engine's start-up timeline (``timeline``: import, config, weight load,
Dynamo, passes, Inductor or cache load, Triton warm-up, KV profile, graph capture, first token, from
``compile_report().timeline``) and ``ready_to_first_token_s``: process start to the first token of the first
generate (the engine ready, plus its first step); the plot stacks the timeline's phases, cold beside warm."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from kiln.bench import common, plots

PHASES = ("cold", "warm")


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    g = p.add_argument_group("first request")
    g.add_argument("--batch-size", type=int, default=8, help="requests of the first (and second) generate")
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=32)
    g.add_argument(
        "--cache-dir",
        default=None,
        help="compile cache root (default: a fresh temp dir, removed afterwards); emptied first",
    )
    g.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    g.add_argument(
        "--load-tokenizer",
        action="store_true",
        help="LLM() loads the checkpoint's tokenizer, as for text prompts (the workload still sends token "
        "ids); without it the start-up skips the tokenizer like the other benchmarks",
    )
    g.add_argument(
        "--profile-dir",
        default=None,
        help="write each start-up's cProfile of LLM() there (<phase>.prof, and <phase>.txt: the top "
        "functions by cumulative and by own time)",
    )
    common.add_output_args(p)


def child(spec: dict) -> dict:
    """One process start: import, build the LLM, two identical generates."""
    # interpreter start plus importing torch and kiln (``kiln.bench`` imports both before we get here)
    import_s = time.time() - spec["spawn_time"]
    from kiln.bench import workload

    profile_dir = spec.get("profile_dir")
    if profile_dir:
        llm, startup = profiled(lambda: common.build_llm(spec["llm_kwargs"]), profile_dir, spec["phase"])
    else:
        llm, startup = common.build_llm(spec["llm_kwargs"])
    wl = workload.synthetic(
        spec["batch_size"], spec["input_len"], spec["output_len"], spec["vocab_size"], spec["seed"]
    )
    times = []
    for _ in range(2):
        common.sync()
        t = time.perf_counter()
        llm.generate(wl.prompts(), wl.sampling_params(), use_tqdm=False)
        common.sync()
        times.append(time.perf_counter() - t)
        llm.reset_prefix_cache()
    report = common.compile_report(llm)
    timeline = (report or {}).get("timeline") or {}
    first_step = (timeline.get("phases_s") or {}).get("first_token")
    to_first_token = None
    if timeline.get("ready_s") is not None and first_step is not None:
        to_first_token = timeline["ready_s"] + first_step
    return {
        "timeline": timeline,
        "ready_to_first_token_s": to_first_token,
        "import_s": import_s,
        "startup_s": startup,
        "first_generate_s": times[0],
        "steady_generate_s": times[1],
        "first_request_overhead_s": max(0.0, times[0] - times[1]),
        "ready_s": import_s + startup + max(0.0, times[0] - times[1]),
        "stages_s": common.stage_times(report),
        "compile_report": report,
        "memory": common.memory_report(llm),
    }


def profiled(fn, directory: str, name: str, top: int = 60):
    """``fn()`` under cProfile; its stats saved as ``<directory>/<name>.prof`` and summarised in
    ``<name>.txt``."""
    import cProfile
    import io
    import pstats

    os.makedirs(directory, exist_ok=True)
    prof = cProfile.Profile()
    result = prof.runcall(fn)
    prof.dump_stats(os.path.join(directory, f"{name}.prof"))
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    for key in ("cumulative", "tottime"):
        stats.sort_stats(key).print_stats(top)
    with open(os.path.join(directory, f"{name}.txt"), "w") as f:
        f.write(text.getvalue())
    return result


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    source = common.get_source(args)
    kwargs = common.engine_kwargs(args, source, args.input_len + args.output_len)
    if args.load_tokenizer:
        kwargs["skip_tokenizer_init"] = False
    spec = {
        "llm_kwargs": kwargs,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "vocab_size": source.vocab_size,
        "seed": args.seed,
        "profile_dir": args.profile_dir,
    }
    root = args.cache_dir or tempfile.mkdtemp(prefix="kiln-compile-cache-")
    shutil.rmtree(root, ignore_errors=True)
    phases = {}
    try:
        for phase in common.progress(PHASES, disable=args.no_progress, desc="start-ups"):
            env = common.cache_env(root)
            phases[phase] = common.run_child("kiln.bench.compile", dict(spec, phase=phase), env, args.timeout)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    results = {"phases": phases}
    config = {
        "model": source.describe(),
        "llm_kwargs": kwargs,
        "args": common.args_dict(args),
        "cache_dir": root if args.cache_dir else "(temporary)",
    }
    path = common.write_result(args, "compile", config, results, argv)
    plot = plots.stacked_bars(
        {ph: breakdown(r) for ph, r in phases.items() if "error" not in r},
        common.result_path(args, "compile", "png"),
        "seconds",
        f"start-up, cold vs warm ({source.spec})",
    )
    print_summary(phases)
    print(f"wrote {path}" + (f" and {plot}" if plot else ""))
    results["path"], results["plot"] = path, plot
    return results


def breakdown(r: dict) -> dict[str, float]:
    """Start-up split into phases, always the same keys in the same order, so stacked bars line up: the
    engine's timeline where it has one, else import, each compile stage, the rest of ``LLM()`` and
    first-request extra."""
    phases = (r.get("timeline") or {}).get("phases_s")
    if phases:
        from kiln.runtime.startup_timeline import PHASES

        return {p: phases.get(p, 0.0) for p in PHASES}
    stages = {k: v or 0.0 for k, v in (r.get("stages_s") or {}).items()}
    out = {"import": r["import_s"], **{s: stages.get(s, 0.0) for s in common.STAGES}}
    out["other LLM()"] = max(0.0, r["startup_s"] - sum(stages.values()))
    out["first request extra"] = r["first_request_overhead_s"]
    return out


def print_summary(phases: dict) -> None:
    print("\nstart-up (s)")
    for phase, r in phases.items():
        if "error" in r:
            print(f"  {phase}: failed: {r['error']}")
            continue
        stages = (
            ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items() if v is not None) or "no stage report"
        )
        print(
            f"  {phase}: import {r['import_s']:.2f}, LLM() {r['startup_s']:.2f}, first request extra "
            f"{r['first_request_overhead_s']:.2f}, ready {r['ready_s']:.2f}  [{stages}]"
        )
        phases = (r.get("timeline") or {}).get("phases_s")
        if phases:
            print("    timeline: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))


if __name__ == "__main__":
    common.child_main(child)
