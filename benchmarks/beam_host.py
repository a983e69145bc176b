"""Host cost of a beam-search step on the CPU: ``LLM.beam_search`` with the decoder replaced by a
stand-in that costs next to nothing, so what is left is what the host does per step.

    python benchmarks/beam_host.py --vocab-size 128256 --prompts 64 --width 4 --new-tokens 128 \\
        --out benchmarks/results/beam_host_cpu.json

The model is the ``tiny`` shape (one layer, random weights) with ``--vocab-size`` entries; its decoder
becomes ``norm(embed(ids) + embed(positions))`` (no attention: the KV cache is never read, so beams
differ by their last token and position only). Everything else is the real path: the scheduler, the
runner's inputs and block copies, the LM head, the sampler with ``2 * width`` logprobs, the output
processor and the search. Torch runs on this thread only (``set_num_threads(1)``) and every figure is
this thread's CPU time (``time.thread_time``), so other processes on the machine change it little.
Per search step (median of ``--repeats`` runs) it reports the stand-in forward, the LM head, the
sampler (on the CPU its vocabulary-sized tensor work counts here, which a GPU does on the device),
the rest of the engine step, and the search outside the engine steps (candidate choice, forks,
drops, the results). Python's garbage collector runs wherever it is due, so the split between
phases varies more than the total.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kiln import LLM, BeamSearchParams  # noqa: E402
from kiln.bench import env  # noqa: E402
from kiln.bench.common import emit_result  # noqa: E402
from kiln.bench.shapes import shape_config  # noqa: E402
from kiln.bench.workload import patterned_ids  # noqa: E402

PHASES = ("forward", "lm_head", "sampler", "engine_step")


def build(args) -> tuple[LLM, dict]:
    config = shape_config("tiny")
    config.update(vocab_size=args.vocab_size, num_hidden_layers=1)
    path = tempfile.mkdtemp(prefix="kiln-beam-host-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    llm = LLM(
        path,
        load_format="dummy",
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=args.prompt_len + args.new_tokens + 16,
        max_num_seqs=args.prompts * args.width,
        kv_cache_memory_bytes=2**28,
    )
    engine = llm.llm_engine
    runner = engine.worker.runner
    decoder = runner.model.model
    seconds = dict.fromkeys(PHASES, 0.0)

    def timed(name, fn):
        def wrapped(*a, **kw):
            t = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] += time.thread_time() - t

        return wrapped

    vocab = args.vocab_size
    runner.forward = timed(
        "forward",
        lambda ids, pos: decoder.norm(decoder.embed_tokens(ids) + decoder.embed_tokens(pos % vocab)),
    )
    runner.logits = timed("lm_head", runner.logits)
    runner._sample = timed("sampler", runner._sample)
    engine.step = timed("engine_step", engine.step)
    return llm, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    doc = env.collect(config=vars(args))
    doc["benchmark"] = "beam_host"
    doc["timer"] = "time.thread_time, torch.set_num_threads(1)"
    torch.set_num_threads(1)
    llm, seconds = build(args)
    workload = [
        {"prompt_token_ids": patterned_ids(i, args.prompt_len, args.vocab_size)} for i in range(args.prompts)
    ]
    params = BeamSearchParams(beam_width=args.width, max_tokens=args.new_tokens, ignore_eos=True)
    llm.beam_search(workload[:4], BeamSearchParams(beam_width=args.width, max_tokens=4, ignore_eos=True))
    runs = []
    for _ in range(args.repeats):
        llm.reset_prefix_cache()
        for name in seconds:
            seconds[name] = 0.0
        start = time.thread_time()
        outs = llm.beam_search(workload, params)
        total = time.thread_time() - start
        assert all(len(s.tokens) == args.prompt_len + args.new_tokens for o in outs for s in o.sequences)
        steps = args.new_tokens
        run = {
            "total": total,
            "forward": seconds["forward"],
            "lm_head": seconds["lm_head"],
            "sampler": seconds["sampler"],
            "engine_rest": seconds["engine_step"]
            - seconds["forward"]
            - seconds["lm_head"]
            - seconds["sampler"],
            "search": total - seconds["engine_step"],
        }
        runs.append({k: round(1e3 * v / steps, 3) for k, v in run.items()})
        print(json.dumps(runs[-1]), flush=True)
    median = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    median["host_without_sampler"] = round(median["engine_rest"] + median["search"], 3)
    doc["results"] = {"ms_per_step_runs": runs, "ms_per_step_median": median, "steps": args.new_tokens}
    llm.shutdown()
    emit_result(doc, args.out)


if __name__ == "__main__":
    main()
