"""Compiler benchmarks: cold vs warm start-up, and what each graph pass buys.

    python benchmarks/compile.py startup --model llama-1b --out OUT.json
    python benchmarks/compile.py passes --model llama-1b --layers 2 --out OUT.json

``startup``: ``LLM(...)`` built in fresh processes: eager, then compiled with an empty cache (cold),
then again (warm, from the cache). Reports LLM() wall time, the compile report's stages and the
first generate. ``passes``: the model (named shape, random weights, ``--layers`` decoder layers)
compiled piecewise once per pass setting; median forward time per token count.
``--model`` takes a shape of ``kiln.bench.shapes`` (llama-1b, llama-8b, qwen3-0.6b, tiny) or a model dir.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MARK = "COMPILE_BENCH_RESULT "

PASS_VARIANTS = {
    "no_passes": {"eliminate_noops": False},
    "noop_elimination": {"eliminate_noops": True},
    "noop+fuse_add_rms_norm": {"eliminate_noops": True, "fuse_add_rms_norm": True},
    "noop+fuse_silu_mul": {"eliminate_noops": True, "fuse_silu_mul": True},
}


def model_dir(spec: str, layers: int | None = None) -> tuple[str, str]:
    """(directory, load_format): a named shape becomes a config-only directory with dummy weights."""
    from kiln.bench.shapes import SHAPES, shape_config

    if spec not in SHAPES:
        return spec, "auto"
    config = shape_config(spec)
    if layers:
        config["num_hidden_layers"] = layers
    path = tempfile.mkdtemp(prefix=f"kiln-compile-bench-{spec}-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path, "dummy"


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------------- startup


def child(spec: dict) -> dict:
    """One fresh process: build the LLM, time it, run one small generate."""
    imported = time.time()
    import torch

    from kiln import LLM, SamplingParams

    import_s = time.time() - spec["spawn_time"]
    kwargs = dict(spec["llm_kwargs"])
    t = time.perf_counter()
    llm = LLM(**kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    startup_s = time.perf_counter() - t
    prompts = [{"prompt_token_ids": [(7 * i + j) % 1000 + 5 for j in range(32)]} for i in range(4)]
    t = time.perf_counter()
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    first_generate_s = time.perf_counter() - t
    return {
        "import_s": import_s,
        "import_to_llm_s": time.time() - imported,
        "llm_startup_s": startup_s,
        "first_generate_s": first_generate_s,
        "graph_capture_s": getattr(llm.llm_engine, "graph_capture_seconds", None),
        "compile_report": llm.compile_report().to_dict(),
        "tokens": [o.outputs[0].token_ids for o in out],
    }


def spawn(spec: dict, timeout: float) -> dict:
    spec = dict(spec, spawn_time=time.time())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        timeout=timeout,
    )
    wall = time.perf_counter() - t
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK) :]), process_wall_s=wall)
    return {"error": f"exit code {proc.returncode}", "stdout_tail": proc.stdout.splitlines()[-5:]}


def startup(args) -> dict:
    path, load_format = model_dir(args.model)
    root = args.cache_dir or tempfile.mkdtemp(prefix="kiln-compile-cache-")
    shutil.rmtree(root, ignore_errors=True)
    base = dict(
        model=path, load_format=load_format, skip_tokenizer_init=True, max_model_len=args.max_model_len
    )
    compiled = dict(base, compilation_config=dict(json.loads(args.compilation_config), cache_dir=root))
    runs = {"eager": spawn({"llm_kwargs": dict(base, enforce_eager=True)}, args.timeout)}
    runs["cold"] = spawn({"llm_kwargs": compiled}, args.timeout)
    for i in range(args.warm_runs):
        runs[f"warm{i + 1}"] = spawn({"llm_kwargs": compiled}, args.timeout)
    summary = {}
    for name, r in runs.items():
        if "error" in r:
            summary[name] = r["error"]
            continue
        rep = r["compile_report"]
        summary[name] = (
            f"LLM() {r['llm_startup_s']:.1f}s (compile {rep['total_s']:.1f}s: dynamo {rep['dynamo_s']:.1f}, "
            f"inductor {rep['inductor_s']:.1f}, cache load {rep['cache_load_s']:.1f}; "
            f"cache {rep['cache_status']})"
        )
        if name != "eager" and "error" not in runs["eager"]:
            r["same_tokens_as_eager"] = r["tokens"] == runs["eager"]["tokens"]
    if args.cache_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return {"runs": runs, "summary": summary}


# ---------------------------------------------------------------------------------------------- passes


def _forward_inputs(forward, num_tokens: int, decode: bool):
    """Inputs and attention metadata for one step: ``num_tokens`` sequences of one new token each
    (decode, 64 tokens of context) or one sequence of ``num_tokens`` (prefill)."""
    import torch

    from kiln.ops.metadata import AttentionMetadata

    cfg, dev, block = forward.model_config, forward.device, 16
    ctx = 64 if decode else num_tokens
    seqs = num_tokens if decode else 1
    per_seq = -(-ctx // block)
    dtype = next(forward.model.parameters()).dtype
    cache = torch.zeros(2, seqs * per_seq, block, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
    tables = torch.arange(seqs * per_seq, dtype=torch.int32, device=dev).view(seqs, per_seq)
    if decode:
        positions = torch.full((seqs,), ctx - 1, device=dev)
        slots = tables[:, (ctx - 1) // block].long() * block + (ctx - 1) % block
        starts = torch.arange(seqs + 1, dtype=torch.int32, device=dev)
    else:
        positions = torch.arange(ctx, device=dev)
        slots = torch.arange(ctx, device=dev)  # sequence 0 owns blocks 0.. in order
        starts = torch.tensor([0, ctx], dtype=torch.int32, device=dev)
    md = AttentionMetadata(
        slots,
        starts,
        torch.full((seqs,), ctx, dtype=torch.int32, device=dev),
        tables,
        1 if decode else ctx,
        ctx,
    )
    ids = torch.randint(0, cfg.vocab_size, (num_tokens,), device=dev)
    return ids, positions, md, [cache] * cfg.num_layers


def time_variants(forwards: dict, num_tokens: int, decode: bool, iters: int) -> dict[str, float]:
    """Median ms per forward of each variant, timed round-robin (one call of each variant in turn) so
    that load changes on the machine hit every variant alike."""
    import torch

    from kiln.ops.forward_context import forward_context

    first = next(iter(forwards.values()))
    ids, positions, md, caches = _forward_inputs(first, num_tokens, decode)
    sync = torch.cuda.synchronize if first.device.type == "cuda" else (lambda: None)
    times = {name: [] for name in forwards}
    with torch.inference_mode(), forward_context(md, caches, first.attention):
        for i in range(iters + 3):
            for name, forward in forwards.items():
                sync()
                t = time.perf_counter()
                forward(ids, positions)
                sync()
                if i >= 3:
                    times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def passes(args) -> dict:
    import torch

    from kiln.compiler.compiled_forward import CompiledForward
    from kiln.compiler.config import CompilationConfig
    from kiln.models.config import ModelConfig
    from kiln.models.loader import build_model, read_config

    path, load_format = model_dir(args.model, args.layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mc = ModelConfig.from_dict(read_config(path))
    mc.max_position_embeddings = min(mc.max_position_embeddings, 8192)
    model = build_model(path, mc, dtype, device, load_format)
    backend = "triton" if device.type == "cuda" else "torch"
    tokens = [int(t) for t in args.tokens.split(",")]
    forwards, results = {}, {}
    for name, toggles in PASS_VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        cfg = CompilationConfig(mode=3, use_cache=False, pass_config=toggles)
        forward = CompiledForward(
            model, mc, cfg, cfg.mode, dtype, device, backend, trace_tokens=min(256, max(tokens))
        )
        report = forward.warmup()
        forwards[name] = forward
        results[name] = {
            "compile_s": report.total_s,
            "pattern_matches": dict(report.pattern_matches),
            "noops_removed": report.noops_removed,
        }
    shapes = [(f"decode_{n}_ms", n, True) for n in tokens]
    shapes += [(f"prefill_{n}_ms", n, False) for n in tokens if n >= 16]
    for key, n, decode in shapes:
        for name, ms in time_variants(forwards, n, decode, args.iters).items():
            results[name][key] = ms
    base = results.get("noop_elimination")
    if base:
        for row in results.values():
            row["vs_noop_elimination_pct"] = {
                k: round(100 * (row[k] / base[k] - 1), 2) for k in row if k.endswith("_ms")
            }
    return {"dtype": str(dtype), "layers": mc.num_layers, "iters": args.iters, "variants": results}


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "child":
        result = child(json.loads(sys.argv[2]))
        sys.stdout.write(MARK + json.dumps(result) + "\n")
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("startup")
    s.add_argument("--compilation-config", default='{"mode": "piecewise"}')
    s.add_argument("--warm-runs", type=int, default=2)
    s.add_argument("--cache-dir", default=None, help="cache root (emptied first; default: a temp dir)")
    s.add_argument("--max-model-len", type=int, default=4096)
    s.add_argument("--timeout", type=float, default=900)
    q = sub.add_parser("passes")
    q.add_argument("--layers", type=int, default=4, help="decoder layers kept (identical pieces repeat)")
    q.add_argument("--tokens", default="1,8,64,256")
    q.add_argument("--iters", type=int, default=30)
    q.add_argument("--only", default=None, help="comma-separated variants of " + ", ".join(PASS_VARIANTS))
    for sp in (s, q):
        sp.add_argument("--model", default="llama-1b")
        sp.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args()
    result = startup(args) if args.cmd == "startup" else passes(args)
    result = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "env": environment(),
        "model": args.model,
        **result,
    }
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps(result.get("summary", result.get("variants")), indent=1, default=str))


if __name__ == "__main__":
    main()
