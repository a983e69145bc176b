"""Pieces shared by the ``kiln bench`` subcommands: engine arguments, building the ``LLM``, memory
readings, percentiles, progress bars and writing result files."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import time
from typing import Any

from kiln.bench import env
from kiln.bench.shapes import SHAPES, ModelSource, resolve_model

# ---------------------------------------------------------------------------------------------- arguments


def parse_json_arg(value: str | None) -> Any:
    """A JSON literal, or ``@path`` / a path of a JSON file."""
    if value is None:
        return None
    text = value
    path = value[1:] if value.startswith("@") else value
    if value.startswith("@") or (os.path.isfile(path) and not value.lstrip().startswith(("{", "["))):
        with open(path) as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON (nor a JSON file): {value!r}: {e}") from e


def int_list(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e
    if not items or any(v <= 0 for v in items):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return items


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default="llama-1b",
        help=f"a named shape with random weights ({', '.join(SHAPES)}) or a local model dir "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "gguf", "dummy"],
        help="weights of a model dir (named shapes always use dummy)",
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer dir for text prompts in --dataset")
    g.add_argument("--dtype", default="auto")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default: the longest request of the workload, rounded up to 256",
    )
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=None,
        help="KV cache size; default: profiled on GPU, 512 MiB on CPU",
    )
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--attention-backend", default=None, choices=["torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", help="no compilation, no graphs")
    g.add_argument(
        "--compilation-config",
        "-cc",
        type=parse_json_arg,
        default=None,
        help="JSON dict (or @file) passed to LLM(compilation_config=...)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quantization", default=None, help="e.g. fp8: weights quantized at load")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | fp8_e4m3")


def add_output_args(p: argparse.ArgumentParser, compare: bool = False) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--output-dir", default="bench_results", help="where result files go (default: %(default)s)"
    )
    g.add_argument("--tag", default=None, help="suffix of the result file names")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if compare:
        g.add_argument(
            "--compare",
            choices=["hf"],
            default=None,
            help="also run HF transformers on the same workload and print kiln/HF",
        )
        g.add_argument(
            "--hf-variants",
            default=None,
            help="comma list of eager,static-compile (default: eager, plus static-compile on GPU)",
        )
        g.add_argument(
            "--hf-batch-size",
            type=int,
            default=None,
            help="most prompts per HF generate call, in equal batches (default: the engine's max_num_seqs)",
        )


def default_max_model_len(source: ModelSource, longest: int) -> int:
    limit = int(source.config.get("max_position_embeddings", 2048))
    return min(limit, 256 * math.ceil((longest + 1) / 256))


def engine_kwargs(
    args: argparse.Namespace,
    source: ModelSource,
    longest: int,
    enforce_eager: bool | None = None,
    compilation_config: Any = "args",
) -> dict:
    """``LLM(...)`` keyword arguments from the parsed command line (overridable per sweep config)."""
    kw: dict[str, Any] = dict(
        model=source.path,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager if enforce_eager is None else enforce_eager,
        max_model_len=args.max_model_len or default_max_model_len(source, longest),
    )
    cc = args.compilation_config if compilation_config == "args" else compilation_config
    if cc is not None:
        kw["compilation_config"] = cc
    if source.load_format != "auto":
        kw["load_format"] = source.load_format
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory_bytes"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if getattr(args, "no_prefix_caching", False):
        kw["enable_prefix_caching"] = False
    if getattr(args, "attention_backend", None):
        kw["attention_config"] = {"backend": args.attention_backend}
    if getattr(args, "quantization", None):
        kw["quantization"] = args.quantization
    if getattr(args, "kv_cache_dtype", "auto") != "auto":
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    return kw


def get_source(args: argparse.Namespace) -> ModelSource:
    fmt = args.load_format
    try:
        return resolve_model(args.model, fmt)
    except ValueError as e:
        raise SystemExit(
            f"kiln bench: --model {args.model!r}: {e}\n(named shapes: {', '.join(SHAPES)})"
        ) from e


def load_tokenizer(args: argparse.Namespace, source: ModelSource):
    path = args.tokenizer or (source.path if source.has_tokenizer else None)
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------- engine


def build_llm(kwargs: dict):
    """Construct ``LLM(**kwargs)``; return it with the wall-clock start-up seconds."""
    from kiln import LLM

    sync()
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    sync()
    return llm, time.perf_counter() - t0


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_llm(llm) -> None:
    import torch

    if llm is not None:
        llm.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_report(llm=None) -> dict:
    """Peak memory so far (GPU: PyTorch's allocator; CPU: the process's peak resident set)."""
    import torch

    out: dict[str, Any] = {
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out.update(
            gpu_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
            gpu_used_bytes=total - free,
            gpu_total_bytes=total,
        )
    engine = getattr(llm, "llm_engine", None) if llm is not None else None
    if engine is not None:
        out["weights_bytes"] = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        out["kv_cache_bytes"] = sum(t.numel() * t.element_size() for t in engine.kv_caches)
        out["kv_cache_tokens"] = engine.num_blocks * engine.config.block_size
    out["peak_bytes"] = out.get("gpu_peak_allocated_bytes", out["host_peak_rss_bytes"])
    return out


def compile_report(llm) -> dict | None:
    """``llm.compile_report()`` when the engine has one, made JSON-safe; the engine's CUDA-graph capture
    time is added as ``graph_capture_s`` when the report lacks it."""
    report = None
    fn = getattr(llm, "compile_report", None)
    if fn is not None:
        try:
            report = fn()
        except Exception as e:  # a report must never sink a benchmark
            report = {"error": f"{type(e).__name__}: {e}"}
    report = jsonable(report)
    if report is not None and not isinstance(report, dict):
        report = {"report": report}
    capture = getattr(getattr(llm, "llm_engine", None), "graph_capture_seconds", None)
    if capture is not None and stage_times(report)["graph_capture"] is None:
        report = dict(report or {}, graph_capture_s=capture)
    return report


STAGES = ("dynamo", "passes", "inductor", "cache_load", "graph_capture")
_STAGE_ALIASES = {
    "dynamo": ("dynamo", "trace", "tracing"),
    "passes": ("passes", "custom_passes", "fx_passes"),
    "inductor": ("inductor", "inductor_compile", "codegen"),
    "cache_load": ("cache_load", "cache"),
    "graph_capture": (
        "graph_capture",
        "cudagraph_capture",
        "cudagraph",
        "cudagraphs",
        "cuda_graph",
        "capture",
    ),
}


def stage_times(report: dict | None) -> dict[str, float | None]:
    """Seconds per compile stage read out of a ``compile_report()`` dict (``None`` where absent).

    Looks in ``report["stages"]`` / ``report["times"]`` first, then at top-level keys; a key matches a
    stage when it equals one of the stage's names with an optional ``_s``/``_time``/``_seconds`` suffix.
    """
    result: dict[str, float | None] = dict.fromkeys(STAGES)
    if not isinstance(report, dict):
        return result
    pools = [
        report.get(k)
        for k in ("stages", "times", "timings", "stage_times")
        if isinstance(report.get(k), dict)
    ]
    pools.append(report)
    for pool in pools:
        normalized = {}
        for key, value in pool.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                k = str(key).lower()
                for suffix in ("_seconds", "_time_s", "_time", "_secs", "_s"):
                    if k.endswith(suffix):
                        k = k[: -len(suffix)]
                        break
                normalized[k] = float(value)
        for stage, names in _STAGE_ALIASES.items():
            if result[stage] is None:
                for name in names:
                    if name in normalized:
                        result[stage] = normalized[name]
                        break
    return result


# ---------------------------------------------------------------------------------------------- statistics


def rates(num_requests: int, num_input_tokens: int, num_output_tokens: int, elapsed: float) -> dict:
    """Requests and tokens per second of a run that took ``elapsed`` seconds."""
    return {
        "requests_per_s": num_requests / elapsed,
        "input_tokens_per_s": num_input_tokens / elapsed,
        "output_tokens_per_s": num_output_tokens / elapsed,
        "total_tokens_per_s": (num_input_tokens + num_output_tokens) / elapsed,
    }


def percentiles(values: list[float], points=(50, 90, 99)) -> dict[str, float | None]:
    """Mean, min, max and the given percentiles (linear interpolation) of ``values``."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return {"mean": None, "min": None, "max": None, **{f"p{p}": None for p in points}, "n": 0}
    out = {"mean": sum(vals) / len(vals), "min": vals[0], "max": vals[-1]}
    for p in points:
        pos = (len(vals) - 1) * p / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(vals) - 1)
        out[f"p{p}"] = vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
    out["n"] = len(vals)
    return out


def request_latencies(outputs) -> dict[str, list[float]]:
    """Per-request TTFT, TPOT and end-to-end seconds from ``RequestOutput.metrics``, and TTFT's first
    part, ``queue``: arrival to the first step that scheduled the request."""
    ttft, tpot, e2e, queue = [], [], [], []
    for out in outputs:
        m = out.metrics
        if m is None or m.arrival_time is None or m.finished_time is None:
            continue
        n = sum(len(c.token_ids) for c in out.outputs) // max(1, len(out.outputs))
        e2e.append(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            queue.append(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            ttft.append(m.first_token_time - m.arrival_time)
            if n > 1:
                tpot.append((m.finished_time - m.first_token_time) / (n - 1))
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "queue": queue}


# ---------------------------------------------------------------------------------------------- output


def progress(iterable=None, disable: bool = False, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable, dynamic_ncols=True, file=sys.stderr, **kw)


def jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy (dataclasses, dtypes, devices, tuples and sets become plain values)."""
    import dataclasses

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):
        return jsonable(obj.model_dump())
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return jsonable(obj.item())
        except Exception:
            pass
    return str(obj)


def result_path(args: argparse.Namespace, kind: str, ext: str = "json") -> str:
    name = f"bench_{kind}" + (f"_{args.tag}" if getattr(args, "tag", None) else "")
    os.makedirs(args.output_dir, exist_ok=True)
    return os.path.join(args.output_dir, f"{name}.{ext}")


def write_result(
    args: argparse.Namespace, kind: str, config: dict, results: dict, argv: list[str] | None = None
) -> str:
    """``bench_<kind>[_<tag>].json``: environment, full command, configuration and results."""
    doc = env.collect(argv, config)
    doc["benchmark"] = kind
    doc["results"] = results
    path = result_path(args, kind)
    with open(path, "w") as f:
        json.dump(jsonable(doc), f, indent=2)
        f.write("\n")
    return path


def save_result(doc: dict, out: str | None) -> str:
    """Write a benchmark script's result document to ``out`` when given; returns its JSON text."""
    text = json.dumps(jsonable(doc), indent=1)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


def emit_result(doc: dict, out: str | None) -> None:
    """Print a benchmark script's result document and write it to ``out`` when given."""
    print(save_result(doc, out))


def args_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


def fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------ child processes

RESULT_MARKER = "KILN_BENCH_RESULT "


def cache_env(cache_root: str) -> dict[str, str]:
    """Environment pointing every compile cache (Inductor, Triton, kiln) into ``cache_root``."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_root, "inductor"),
        "TRITON_CACHE_DIR": os.path.join(cache_root, "triton"),
        "KILN_CACHE_DIR": os.path.join(cache_root, "kiln"),
    }


def run_child(
    module: str, spec: dict, extra_env: dict[str, str] | None = None, timeout: float | None = None
) -> dict:
    """Run ``python -m <module> --child <spec json>`` in a fresh process; return the dict it reports.

    The child's stderr goes straight through; a crash or timeout comes back as ``{"error": ...}``.
    """
    import subprocess

    environ = dict(os.environ)
    environ.update(extra_env or {})
    environ.setdefault("PYTHONUNBUFFERED", "1")
    spec = dict(spec, spawn_time=time.time())
    cmd = [sys.executable, "-m", module, "--child", json.dumps(jsonable(spec))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=environ, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "process_wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER) :])
            result["process_wall_s"] = wall
            return result
    tail = proc.stdout.strip().splitlines()[-5:]
    return {
        "error": f"child exited with {proc.returncode} and no result",
        "stdout_tail": tail,
        "process_wall_s": wall,
    }


def child_report(result: dict) -> None:
    """The child's side of ``run_child``: print the result on one marked line."""
    sys.stdout.write(RESULT_MARKER + json.dumps(jsonable(result)) + "\n")
    sys.stdout.flush()


def child_main(fn) -> None:
    """Entry of ``python -m kiln.bench.<x> --child SPEC``: run ``fn(spec)``, report, never raise."""
    import traceback

    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        raise SystemExit(f"usage: python -m {fn.__module__} --child SPEC_JSON (internal)")
    spec = json.loads(sys.argv[2])
    try:
        result = fn(spec)
    except BaseException as e:  # report the failure to the parent instead of a bare exit code
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    child_report(result)
