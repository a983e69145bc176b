"""Host cost of the engine's step loop without a model: scheduler, KV-block bookkeeping, output
processing and the engine loop, against a worker that returns a fixed token at once.

    python benchmarks/host_step.py [--num-prompts 1000 --input-len 256 --output-len 256 --max-num-seqs 256]

What it prints is the CPU time of this process per engine step and per generated token
(``time.process_time``, so other processes on the machine change it less than wall time). The model
runner's input preparation and the sampler are not in it (they need a real worker): ``--runner-prepare``
times ``ModelRunner._prepare`` alone on one decode step of ``--max-num-seqs`` rows (block tables of
24-31 blocks, the CPU attention backend's metadata); see ``step_profile.py`` for a whole run on a GPU.
``--sampler`` times ``sample()`` on ``--max-num-seqs`` rows with the throughput bench's parameters (one
``SamplingParams`` per request, temperature 1) and a vocabulary of 8, so its per-row Python is what it
measures. ``--decode-steps N`` times N decode steps once ``--max-num-seqs`` sequences all decode
(``--profile``: their cProfile, by own time and by cumulative time).
"""

import argparse
import cProfile
import json
import pstats
import time
import types

import torch

from kiln.bench.constant_worker import ConstantWorker
from kiln.runtime.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_data import SchedulerOutput


def time_runner_prepare(rows: int, repeats: int = 300) -> float:
    """CPU seconds of one ``ModelRunner._prepare`` over a decode step of ``rows`` sequences."""
    from kiln.ops.attention_backend import AttentionBackend
    from kiln.runtime.model_runner import ModelRunner
    from kiln.runtime.step_data import ScheduledSequence

    p = SamplingParams()
    out = SchedulerOutput(
        [
            ScheduledSequence(i, [5], 300 + i % 40, 1, False, list(range(i * 32, i * 32 + 24 + i % 8)), True,
                              p, 10, [], [])
            for i in range(rows)
        ]
    )  # fmt: skip
    attention = types.SimpleNamespace(block_size=16, device=torch.device("cpu"))
    attention.build = types.MethodType(AttentionBackend.build, attention)
    runner = object.__new__(ModelRunner)
    runner.__dict__.update(attention=attention, _previous_rows={}, lora=None, previous=None)
    runner._prepare(out)
    t0 = time.process_time()
    for _ in range(repeats):
        runner._prepare(out)
    return (time.process_time() - t0) / repeats


def time_decode_steps(config: EngineConfig, blocks: int, args) -> float:
    """CPU seconds of one engine step while ``max_num_seqs`` sequences decode (prefills done)."""
    worker = ConstantWorker(blocks, args.block_size)
    engine = LLMEngine(config, types.SimpleNamespace(eos_token_id=[3]), None, worker=worker)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    for i in range(args.max_num_seqs):
        prompt = [(i * 7919 + j * 104729) % 30000 + 10 for j in range(args.input_len)]
        engine.add_request(str(i), None, prompt, params)
    running = engine.scheduler.running
    while len(running) < args.max_num_seqs or any(s.num_computed_tokens < args.input_len for s in running):
        engine.step()
    for _ in range(5):
        engine.step()
    assert args.decode_steps + 5 < args.output_len, "--decode-steps: the sequences would finish"
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    t0 = time.process_time()
    for _ in range(args.decode_steps):
        engine.step()
    cpu = time.process_time() - t0
    if profile is not None:
        profile.disable()
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(20)
    return cpu / args.decode_steps


def time_sampler(rows: int, repeats: int = 300) -> float:
    """CPU seconds of one ``sample()`` over ``rows`` rows of the bench's sampling parameters."""
    from kiln.bench.workload import sampling_params
    from kiln.runtime.sampler import SamplingRow, sample

    seqs = [SamplingRow(sampling_params(256), None, 10, [1, 2], [3]) for _ in range(rows)]
    logits = torch.randn(rows, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    sample(logits, seqs, generator)
    t0 = time.process_time()
    for _ in range(repeats):
        sample(logits, seqs, generator)
    return (time.process_time() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runner-prepare", action="store_true", help="time ModelRunner._prepare only")
    ap.add_argument("--sampler", action="store_true", help="time the sampler's sample() only")
    ap.add_argument("--decode-steps", type=int, default=None, help="time this many decode steps only")
    ap.add_argument("--profile", action="store_true", help="with --decode-steps: print their cProfile")
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    single = (
        ("sampler", "--sampler", "sample_cpu_us", time_sampler),
        ("runner_prepare", "--runner-prepare", "runner_prepare_cpu_us", time_runner_prepare),
    )
    for name, flag, key, timer in single:
        if getattr(args, name):
            best = min(timer(args.max_num_seqs) for _ in range(args.repeats))
            result = {"command": f"python benchmarks/host_step.py {flag}", "rows": args.max_num_seqs}
            result[key] = round(1e6 * best, 1)
            print(json.dumps(result))
            if args.output:
                with open(args.output, "w") as f:
                    json.dump(result, f, indent=1)
            return

    max_len = args.input_len + args.output_len
    blocks = args.max_num_seqs * -(-max_len // args.block_size) * 2
    config = EngineConfig(
        model_path="",
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_model_len=max_len,
        max_model_len_explicit=True,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
    )
    if args.decode_steps is not None:
        per_step = [time_decode_steps(config, blocks, args) for _ in range(args.repeats)]
        result = {
            "command": "python benchmarks/host_step.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
            "decode_steps": args.decode_steps,
            "running": args.max_num_seqs,
            "cpu_us_per_decode_step": [round(1e6 * s, 1) for s in per_step],
            "best_cpu_us_per_decode_step": round(1e6 * min(per_step), 1),
        }
        print(json.dumps(result, indent=1))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
        return
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    per_step = []
    for r in range(args.repeats):
        worker = ConstantWorker(blocks, args.block_size)
        engine = LLMEngine(config, types.SimpleNamespace(eos_token_id=[3]), None, worker=worker)
        for i in range(args.num_prompts):
            prompt = [(i * 7919 + j * 104729) % 30000 + 10 for j in range(args.input_len)]
            engine.add_request(f"{r}-{i}", None, prompt, params)
        t0 = time.process_time()
        tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
        cpu = time.process_time() - t0
        assert tokens == args.num_prompts * args.output_len, tokens
        per_step.append(cpu / worker.steps)
    best = min(per_step)
    result = {
        "command": "python benchmarks/host_step.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "steps": worker.steps,
        "cpu_ms_per_step": [round(1e3 * s, 3) for s in per_step],
        "best_cpu_ms_per_step": round(1e3 * best, 3),
        "best_cpu_us_per_token": round(1e6 * best * worker.steps / tokens, 3),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
