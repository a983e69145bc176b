"""``kiln bench sweep --configs FILE``: run one workload under each of a list of compilation settings
and compare start-up, TPOT per batch size and throughput.

FILE is JSON: a list (or ``{"configs": [...]}``) of entries ``{"name": str, "enforce_eager": bool,
"compilation_config": dict | int | null, "llm_kwargs": {...}}`` (all but ``name`` optional). Each
entry runs in a fresh process with empty compile caches, so start-up times are cold and one entry's
compiled state cannot leak into the next.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

from kiln.bench import common, plots, workload

_ENTRY_KEYS = {"name", "enforce_eager", "compilation_config", "llm_kwargs", "description"}


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    p.add_argument(
        "--configs", required=True, help="JSON file of configurations (see benchmarks/sweep_configs.json)"
    )
    p.add_argument("--only", default=None, help="comma-separated config names to run (default: all)")
    g = p.add_argument_group("workload")
    g.add_argument("--batch-sizes", type=common.int_list, default=[1, 8, 64], help="TPOT batch sizes")
    g.add_argument("--input-len", type=int, default=256)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--num-iters", type=int, default=2, help="timed latency iterations per batch size")
    g.add_argument("--num-prompts", type=int, default=200, help="throughput requests (0: skip throughput)")
    g.add_argument(
        "--isolation",
        choices=["process", "inline"],
        default="process",
        help="a fresh process per config (default) or all in this process (start-up then is not cold)",
    )
    g.add_argument("--timeout", type=float, default=1800.0, help="seconds per config process")
    common.add_output_args(p)


def load_configs(path: str, only: str | None = None) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = data.get("configs")
    if not isinstance(data, list) or not data:
        raise SystemExit(f"kiln bench sweep: {path}: expected a non-empty list of configurations")
    names = set()
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise SystemExit(f"kiln bench sweep: {path}: entry {i} needs a 'name' string")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise SystemExit(
                f"kiln bench sweep: {path}: entry {entry['name']!r}: unknown keys {sorted(unknown)}"
            )
        if entry["name"] in names:
            raise SystemExit(f"kiln bench sweep: {path}: duplicate name {entry['name']!r}")
        names.add(entry["name"])
    bad = [f"{e['name']}: {err}" for e in data if (err := check_compilation_config(e)) is not None]
    if bad:
        raise SystemExit(f"kiln bench sweep: {path}: invalid compilation_config in " + "; ".join(bad))
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise SystemExit(f"kiln bench sweep: --only names not in {path}: {missing}")
        data = [e for e in data if e["name"] in wanted]
    return data


def check_compilation_config(entry: dict) -> str | None:
    """Validate an entry's compilation_config with kiln's own parser (when kiln has one)."""
    try:
        from kiln.compiler.config import CompilationConfig
    except ImportError:
        return None
    try:
        CompilationConfig.parse(entry.get("compilation_config"))
    except ValueError as e:
        return str(e)
    return None


def entry_kwargs(args: argparse.Namespace, source, entry: dict, longest: int) -> dict:
    kw = common.engine_kwargs(
        args,
        source,
        longest,
        enforce_eager=bool(entry.get("enforce_eager", False)),
        compilation_config=entry.get("compilation_config"),
    )
    if args.max_num_seqs is None:
        kw["max_num_seqs"] = max(256, max(args.batch_sizes))
    kw.update(entry.get("llm_kwargs") or {})
    return kw


def child(spec: dict) -> dict:
    """Everything measured for one configuration."""
    from kiln.bench import latency, throughput

    llm, startup = common.build_llm(spec["llm_kwargs"])
    vocab, seed = spec["vocab_size"], spec["seed"]
    out: dict = {"startup_s": startup}
    first = workload.synthetic(1, spec["input_len"], 4, vocab, seed)
    common.sync()
    t = time.perf_counter()
    llm.generate(first.prompts(), first.sampling_params(), use_tqdm=False)
    common.sync()
    out["first_generate_s"] = time.perf_counter() - t
    llm.reset_prefix_cache()
    out["latency"] = []
    for bs in spec["batch_sizes"]:
        wl = workload.synthetic(bs, spec["input_len"], spec["output_len"], vocab, seed + bs)
        out["latency"].append(
            latency.measure_batch(
                llm, [r.prompt_token_ids for r in wl.requests], spec["output_len"], spec["num_iters"], 1
            )
        )
    if spec["num_prompts"]:
        wl = workload.synthetic(spec["num_prompts"], spec["input_len"], spec["output_len"], vocab, seed)
        out["throughput"] = throughput.measure(llm, wl, show_progress=spec.get("progress", False))
    out["compile_report"] = common.compile_report(llm)
    out["stages_s"] = common.stage_times(out["compile_report"])
    out["memory"] = common.memory_report(llm)
    common.free_llm(llm)
    return out


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    entries = load_configs(args.configs, args.only)
    source = common.get_source(args)
    longest = args.input_len + args.output_len
    config = {
        "model": source.describe(),
        "args": common.args_dict(args),
        "configs_file": args.configs,
        "entries": entries,
    }
    rows = []
    for entry in common.progress(entries, disable=args.no_progress, desc="sweep"):
        kwargs = entry_kwargs(args, source, entry, longest)
        spec = {
            "llm_kwargs": kwargs,
            "vocab_size": source.vocab_size,
            "seed": args.seed,
            "batch_sizes": args.batch_sizes,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_iters": args.num_iters,
            "num_prompts": args.num_prompts,
        }
        if args.isolation == "process":
            root = tempfile.mkdtemp(prefix="kiln-sweep-cache-")
            try:
                result = common.run_child("kiln.bench.sweep", spec, common.cache_env(root), args.timeout)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        else:
            try:
                result = child(spec)
            except Exception as e:
                result = {"error": f"{type(e).__name__}: {e}"}
        rows.append({"name": entry["name"], "entry": entry, "llm_kwargs": kwargs, **result})
        status = "failed: " + result["error"] if "error" in result else "ok"
        print(f"[sweep] {entry['name']}: {status}", flush=True)
        # Rewritten after every config, so a run cut short keeps what it measured.
        partial = {"configs": rows, "complete": len(rows) == len(entries)}
        path = common.write_result(args, "sweep", config, partial, argv)
    results = {"configs": rows, "complete": True}
    table = markdown_table(rows, args.batch_sizes)
    md_path = common.result_path(args, "sweep", "md")
    with open(md_path, "w") as f:
        f.write(f"# kiln bench sweep: {source.spec}\n\n")
        f.write(
            f"in {args.input_len} / out {args.output_len} tokens; throughput over {args.num_prompts} "
            f"prompts; TPOT = mean time per output token of one batch; start-up = LLM() wall time, cold "
            f"caches{' (inline: not cold)' if args.isolation == 'inline' else ''}.\n\n"
        )
        f.write(table)
    figs = write_plots(args, rows, source.spec)
    print("\n" + table)
    print(f"wrote {path}, {md_path}" + "".join(f", {p}" for p in figs))
    results.update(path=path, table=md_path, plots=figs)
    return results


def _fmt(x, scale=1.0, digits=2) -> str:
    return "–" if x is None else f"{x * scale:.{digits}f}"


def compact(value) -> str:
    """Short JSON for table cells: long lists shown as ``[first, ..., last] (n)``."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list) and len(value) > 6:
        head = ",".join(compact(v) for v in value[:3])
        return f"[{head},…,{compact(value[-1])}]({len(value)})"
    if isinstance(value, list):
        return "[" + ",".join(compact(v) for v in value) + "]"
    return json.dumps(value)


def markdown_table(rows: list[dict], batch_sizes: list[int]) -> str:
    fixed = [
        "config",
        "eager",
        "compilation_config",
        "start-up s",
        "compile s",
        "graph capture s",
        "first req s",
    ]
    head = fixed + ["total tok/s", "output tok/s"] + [f"TPOT ms @{b}" for b in batch_sizes] + ["status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = next((r["throughput"]["total_tokens_per_s"] for r in rows if r.get("throughput")), None)
    for r in rows:
        cc = r["entry"].get("compilation_config")
        cells = [r["name"], str(bool(r["entry"].get("enforce_eager", False)))]
        cells.append("`" + compact(cc) + "`" if cc is not None else "–")
        if "error" in r:
            cells += ["–"] * (len(head) - len(cells) - 1)
            cells.append("failed: " + r["error"].replace("|", "/").splitlines()[0][:120])
        else:
            st = r.get("stages_s") or {}
            compile_s = sum(st.get(k) or 0.0 for k in ("dynamo", "passes", "inductor", "cache_load"))
            tp = r.get("throughput") or {}
            total = tp.get("total_tokens_per_s")
            rel = f" ({total / base:.2f}x)" if total and base else ""
            tpot = {x["batch_size"]: x["tpot_s"]["mean"] for x in r["latency"]}
            cells += [
                _fmt(r["startup_s"]),
                _fmt(compile_s),
                _fmt(st.get("graph_capture")),
                _fmt(r["first_generate_s"]),
            ]
            cells += [
                (_fmt(total, digits=1) + rel) if total else "–",
                _fmt(tp.get("output_tokens_per_s"), digits=1),
            ]
            cells += [_fmt(tpot.get(b), 1000) for b in batch_sizes] + ["ok"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def startup_parts(r: dict) -> dict[str, float]:
    """Start-up of one config split into compile stages, the rest of ``LLM()`` and the first request."""
    stages = {k: v or 0.0 for k, v in (r.get("stages_s") or {}).items()}
    parts = {s: stages.get(s, 0.0) for s in common.STAGES}
    parts["other LLM()"] = max(0.0, r["startup_s"] - sum(stages.values()))
    parts["first request"] = r["first_generate_s"]
    return parts


def write_plots(args, rows: list[dict], spec: str) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    tpot = {r["name"]: [(x["batch_size"], x["tpot_s"]["mean"]) for x in r["latency"]] for r in ok}
    tput = {r["name"]: (r.get("throughput") or {}).get("total_tokens_per_s") for r in ok}
    startup = {r["name"]: startup_parts(r) for r in ok}
    figs = [
        plots.tpot_vs_batch(
            tpot,
            common.result_path(args, "sweep_tpot", "png"),
            title=f"TPOT vs batch size per config ({spec})",
        ),
        plots.bars(
            tput,
            common.result_path(args, "sweep_throughput", "png"),
            "total tokens/s",
            f"throughput per config ({spec}, {args.num_prompts} prompts)",
        ),
        plots.stacked_bars(
            startup,
            common.result_path(args, "sweep_startup", "png"),
            "seconds",
            f"start-up per config ({spec})",
        ),
    ]
    return [f for f in figs if f]


if __name__ == "__main__":
    common.child_main(child)
