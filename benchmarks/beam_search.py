"""Beam search throughput: ``LLM.beam_search`` vs HF ``generate(num_beams=W)`` in the same run.

    python benchmarks/beam_search.py --model llama-1b --prompts 64 --width 4 --new-tokens 128 \\
        --out benchmarks/results/beam_search_h200.json

kiln runs a named shape with random weights (``load_format="dummy"``); HF runs a model of the same shape
(its own random weights, bfloat16, eager, dynamic cache) over the same prompts in batches of
``--hf-batch`` prompts. Both ignore EOS, so every beam runs ``--new-tokens`` steps. Tokens/s counts
``prompts * width * new_tokens`` generated beam tokens. Target: kiln >= 5x HF. kiln's entry also counts
the tokens its steps computed: the prompts once, then one per beam per search step, and the time per
search step, in all and outside the engine's steps (``benchmarks/beam_host.py`` splits a step's host
cost on the CPU).
"""

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kiln import LLM, BeamSearchParams  # noqa: E402
from kiln.bench import env  # noqa: E402
from kiln.bench.common import emit_result  # noqa: E402
from kiln.bench.hf_compare import build_model  # noqa: E402
from kiln.bench.shapes import shape_config, write_shape_dir  # noqa: E402
from kiln.bench.workload import patterned_ids  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(n: int, length: int, vocab_size: int) -> list[list[int]]:
    return [patterned_ids(i, length, vocab_size) for i in range(n)]


def run_kiln(args, workload) -> dict:
    llm = LLM(
        write_shape_dir(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.prompt_len + args.new_tokens + 16,
        gpu_memory_utilization=0.85,
    )
    params = BeamSearchParams(beam_width=args.width, max_tokens=args.new_tokens, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in workload]
    llm.beam_search(
        batch[:4], BeamSearchParams(beam_width=args.width, max_tokens=4, ignore_eos=True)
    )  # warm-up
    llm.reset_prefix_cache()  # every prompt computed in the measured run
    computed = count_computed_tokens(llm.llm_engine)
    in_steps = time_engine_steps(llm.llm_engine)
    sync()
    start = time.perf_counter()
    outs = llm.beam_search(batch, params)
    sync()
    elapsed = time.perf_counter() - start
    tokens = sum(len(s.tokens) - len(p) for o, p in zip(outs, workload) for s in o.sequences)
    llm.shutdown()
    return {
        "seconds": round(elapsed, 3),
        "beam_tokens": tokens,
        "tok_s": round(tokens / elapsed, 1),
        "engine_steps": computed["steps"],
        "computed_tokens": computed["tokens"],
        # the prompts once, then one token per beam per later step (nothing computed twice)
        "expected_computed_tokens": args.prompts * (args.prompt_len + args.width * (args.new_tokens - 1)),
        "ms_per_search_step": round(1e3 * elapsed / args.new_tokens, 3),
        # the search's own host work between engine steps (choice, forks, drops, the results)
        "search_ms_per_step_outside_engine": round(1e3 * (elapsed - in_steps[0]) / args.new_tokens, 3),
    }


def time_engine_steps(engine) -> list[float]:
    """Seconds spent in ``engine.step`` from now on (a one-element list, filled as steps run)."""
    seconds = [0.0]
    inner = engine.step

    def timed():
        start = time.perf_counter()
        try:
            return inner()
        finally:
            seconds[0] += time.perf_counter() - start

    engine.step = timed
    return seconds


def count_computed_tokens(engine) -> dict:
    """Count the engine steps and the tokens they compute from now on (a wrapper of the worker's
    ``execute_model``)."""
    counts = {"steps": 0, "tokens": 0}
    inner = engine.worker.execute_model

    def counted(out):
        counts["steps"] += 1
        counts["tokens"] += out.total_tokens
        return inner(out)

    engine.worker.execute_model = counted
    return counts


@torch.inference_mode()
def run_hf(args, workload) -> dict:
    from transformers import GenerationConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(shape_config(args.model), torch.bfloat16, device)
    config = GenerationConfig(
        num_beams=args.width,
        num_return_sequences=args.width,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        early_stopping=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    ids = torch.tensor(workload[:2], device=device)
    warm = copy.deepcopy(config)
    warm.max_new_tokens = warm.min_new_tokens = 4
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=warm)
    sync()
    start, tokens = time.perf_counter(), 0
    for lo in range(0, len(workload), args.hf_batch):
        ids = torch.tensor(workload[lo : lo + args.hf_batch], device=device)  # equal lengths: no padding
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        tokens += int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    sync()
    elapsed = time.perf_counter() - start
    del model
    return {"seconds": round(elapsed, 3), "beam_tokens": tokens, "tok_s": round(tokens / elapsed, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    doc = env.collect(config=vars(args))
    doc["benchmark"] = "beam_search"
    doc["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    workload = prompts(args.prompts, args.prompt_len, shape_config(args.model)["vocab_size"])
    kiln = run_kiln(args, workload)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hf = run_hf(args, workload)
    doc["results"] = {
        "kiln": kiln,
        "hf": hf,
        "speedup": round(kiln["tok_s"] / hf["tok_s"], 3),
        "target": ">= 5",
    }
    emit_result(doc, args.out)


if __name__ == "__main__":
    main()
