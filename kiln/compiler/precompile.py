"""``kiln compile <model>``: fill the compile cache ahead of time, as a command.

It starts the engine once with the given settings (so the Dynamo trace, Inductor's compiles, the
attention kernels and, on a GPU, the recorded graph memory all land in the cache entry of those
settings) and prints one line: the entry, hit or miss and why. A later ``LLM(...)`` with the same
code-changing settings (``compilation_config``, dtype, model, quantization, LoRA, ``max_num_batched_tokens``
below 256) loads everything from it; with ``compilation_config={"cache": "require"}`` it refuses to
start without it. ``--check`` makes this command itself a check: exit status 1 when the entry is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

from kiln.compiler.cache import CompileCacheMissError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model dir, .gguf file or hub id, or a named shape (random weights)")
    p.add_argument(
        "--config",
        default=None,
        help='compilation_config as JSON, or a JSON file (default: {"mode": "piecewise"})',
    )
    p.add_argument(
        "--engine-args",
        default=None,
        help="other LLM(...) arguments as JSON, or a JSON file (e.g. dtype, quantization, enable_lora)",
    )
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--load-format", default=None)
    p.add_argument(
        "--check",
        action="store_true",
        help='only check: the cache entry must exist already (cache="require"); exit status 1 when not',
    )


def llm_kwargs(args: argparse.Namespace) -> dict:
    from kiln.bench.common import parse_json_arg
    from kiln.bench.shapes import SHAPES, resolve_model

    config = parse_json_arg(args.config) if args.config else {"mode": "piecewise"}
    if not isinstance(config, dict):
        config = {"mode": config}
    if args.check:
        config = {**config, "cache": "require"}
    kwargs = parse_json_arg(args.engine_args) if args.engine_args else {}
    if not isinstance(kwargs, dict):
        raise SystemExit(f"kiln compile: --engine-args must be a JSON object, got {args.engine_args!r}")
    model = args.model
    if model in SHAPES:
        source = resolve_model(model)
        model, kwargs = source.path, {"load_format": source.load_format, **kwargs}
    kwargs = {"skip_tokenizer_init": True, **kwargs, "model": model, "compilation_config": config}
    for name in ("dtype", "max_num_batched_tokens", "load_format"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from kiln import LLM

    kwargs = llm_kwargs(args)
    try:
        llm = LLM(**kwargs)
    except CompileCacheMissError as e:
        print(f"kiln compile --check: {e}", file=sys.stderr)
        return 1
    report = llm.compile_report()
    llm.shutdown()
    print(
        json.dumps(
            {
                "cache_status": report.cache_status,
                "cache_reason": report.cache_reason,
                "cache_dir": report.cache_dir,
                "cache_key": report.cache_key,
                "mode": report.mode,
            }
        )
    )
    if report.mode == "none":
        print("kiln compile: compilation mode none: nothing to compile", file=sys.stderr)
    return 0
