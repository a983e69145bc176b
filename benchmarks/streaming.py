"""Streaming overhead: ``AsyncLLM`` at N concurrent streams vs ``LLM.generate`` on the same workload and
the same engine, and time to first token at batch 1 through both.

    python benchmarks/streaming.py --model llama-1b --streams 64 --out benchmarks/results/streaming_h200.json

Both paths drive one engine (random weights of a named shape, ``load_format="dummy"``): ``generate``
runs on the engine thread through ``AsyncLLM._call``, the streams through ``AsyncLLM.generate`` with
``output_kind=DELTA``. Targets: streamed output tokens/s >= 95% of ``generate``'s; median TTFT at batch 1
within 5% of ``generate``'s (a one-token ``generate``).

The host cost of streaming, without the model's forward:

    python benchmarks/streaming.py --model tiny --streams 64 --fake-device-ms 0

``--fake-device-ms X`` replaces the engine's worker by ``kiln.bench.constant_worker.ConstantWorker``
(token 7 for every row, a simulated device that runs a step in X ms; 0: no device time, so every
figure is host time; ``--fake-launch-ops K``: K tiny torch calls in each launch, each letting the GIL
go, as a real launch's calls do). Each run also records the process's CPU seconds (both threads) and
the engine steps it took, so ``*_cpu_us_per_step`` is the host time of a step on each path and
``stream_extra_cpu_us_per_step`` what streaming adds to it. ``stream_outputs_per_request`` is how many
outputs a stream got (the engine thread joins the steps between hand-offs when handing over every step
would cost more than a few percent of the time: ``kiln/runtime/engine_thread.py``). ``--stream-interval
N`` passes ``stream_interval=N`` to ``AsyncLLM`` (an output per N tokens instead of per token);
``--handoff-share S`` sets that share (``engine_thread.HANDOFF_SHARE``, 0.03 by default),
``--handoff-wait S`` how long the engine thread waits at most for the loop to run a periodic hand-off
(``engine_thread.HANDOFF_WAIT``, 0.002 by default; 0: it does not wait).

The results' ``breakdown`` (``kiln/bench/stream_trace.py``, from traced repeats after the timed ones)
splits a streamed first token and a one-token ``generate`` into phases, times a no-op call's round
trip through the engine thread (the two thread hops alone), and gives the steps and hand-offs of one
traced streamed run against one ``generate``.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln import AsyncLLM, RequestOutputKind, SamplingParams  # noqa: E402
from kiln.bench import env  # noqa: E402
from kiln.bench.common import emit_result  # noqa: E402
from kiln.bench.constant_worker import ConstantWorker  # noqa: E402
from kiln.bench.shapes import shape_config, write_shape_dir  # noqa: E402
from kiln.bench.stream_trace import StreamTrace, median_phases  # noqa: E402
from kiln.bench.workload import patterned_ids  # noqa: E402
from kiln.runtime import engine_thread  # noqa: E402


def prompts(n: int, length: int, vocab_size: int) -> list[dict]:
    return [{"prompt_token_ids": patterned_ids(i, length, vocab_size)} for i in range(n)]


class StepCounter:
    """Counts the engine's steps (wrapped on the engine thread)."""

    def __init__(self):
        self.steps = 0

    def install(self, llm) -> None:
        engine = llm.llm_engine
        inner = engine.step

        def step():
            self.steps += 1
            return inner()

        engine.step = step


async def stream_all(engine, workload, params, tag) -> tuple[float, int, float, int]:
    """(wall seconds, output tokens, process CPU seconds, outputs received) of the workload streamed."""

    async def one(i, prompt):
        tokens = outputs = 0
        async for out in engine.generate(prompt, params, f"{tag}-{i}"):
            tokens += len(out.outputs[0].token_ids)
            outputs += 1
        return tokens, outputs

    cpu, start = time.process_time(), time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(workload)))
    wall, used = time.perf_counter() - start, time.process_time() - cpu
    return wall, sum(t for t, _ in counts), used, sum(o for _, o in counts)


async def generate_all(engine, workload, params) -> tuple[float, int, float]:
    """(wall seconds, output tokens, process CPU seconds) of one ``generate`` of the workload."""

    def run(llm):
        cpu, start = time.process_time(), time.perf_counter()
        outs = llm.generate(workload, params, use_tqdm=False)
        wall, used = time.perf_counter() - start, time.process_time() - cpu
        return wall, sum(len(o.outputs[0].token_ids) for o in outs), used

    return await engine._call(run)


async def install_constant_worker(engine, step_ms: float, launch_ops: int = 0) -> None:
    def install(llm):
        core = llm.llm_engine
        core.worker = ConstantWorker(core.num_blocks, core.config.block_size, step_ms / 1e3, launch_ops)

    await engine._call(install)


async def ttft(engine, prompt, reps: int) -> tuple[float, float]:
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    streamed, direct = [], []
    own = [one.clone() for _ in range(reps)]  # made before the clock starts, as generate's is
    for r in range(reps):
        start = time.perf_counter()
        async for _ in engine.generate(prompt, own[r], f"ttft-{r}"):
            streamed.append(time.perf_counter() - start)
            break
        direct.append((await generate_all(engine, [prompt], one))[0])
    return statistics.median(streamed), statistics.median(direct)


async def traced(engine, workload, params, prompt, reps: int) -> dict:
    """The breakdown (``kiln.bench.stream_trace``), from repeats apart from the timed ones: the phases
    of a streamed first token and of a one-token ``generate``, a no-op call's round trip through the
    engine thread (its two thread hops alone), and the steps and hand-offs of one streamed run of the
    workload against one ``generate`` of it."""
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    trace = StreamTrace(engine)
    streamed, direct, round_trips = [], [], []
    llm = engine._engine.llm
    own = [one.clone() for _ in range(reps)]
    with trace.installed(llm):
        for r in range(reps):
            trace.reset()
            called = time.perf_counter()
            async for _ in engine.generate(prompt, own[r], f"traced-ttft-{r}"):
                streamed.append(trace.first_token(called, time.perf_counter()))
                break

            def run(llm):
                trace.reset()
                called = time.perf_counter()
                llm.generate([prompt], one, use_tqdm=False)
                return trace.generate_call(called, time.perf_counter())

            direct.append(await engine._call(run))
            start = time.perf_counter()
            await engine._call(lambda llm: None)
            round_trips.append(time.perf_counter() - start)
        trace.reset()
        start = time.perf_counter()
        await stream_all(engine, workload, params["stream"], "traced")
        middle = time.perf_counter()
        await generate_all(engine, workload, params["generate"])
        end = time.perf_counter()
    return {
        "ttft_phases_ms": median_phases(streamed),
        "generate_phases_ms": median_phases(direct),
        "idle_call_round_trip_ms": round(statistics.median(round_trips) * 1e3, 4),
        "stream_steps": trace.step_summary((start, middle)),
        "generate_steps": trace.step_summary((middle, end)),
        "handoffs": trace.handoff_summary((start, middle)),
    }


async def bench(args) -> dict:
    fake = args.fake_device_ms is not None
    engine = AsyncLLM(
        model=write_shape_dir(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.input_len + args.output_len + 16,
        gpu_memory_utilization=0.9,
        stream_interval=args.stream_interval,
        **({"enforce_eager": True} if fake else {}),  # the forward never runs: nothing to compile
    )
    counter = StepCounter()
    try:
        if fake:
            await install_constant_worker(engine, args.fake_device_ms, args.fake_launch_ops)
        await engine._call(counter.install)
        workload = prompts(args.streams, args.input_len, shape_config(args.model)["vocab_size"])
        base = dict(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
        delta = SamplingParams(**base, output_kind=RequestOutputKind.DELTA)
        plain = SamplingParams(**base)
        await stream_all(engine, workload, delta, "warm")
        await generate_all(engine, workload, plain)
        runs = []
        for r in range(args.repeats):  # interleaved, so drift hits both alike
            first = counter.steps
            s_time, s_tokens, s_cpu, s_outputs = await stream_all(engine, workload, delta, f"run{r}")
            middle = counter.steps
            g_time, g_tokens, g_cpu = await generate_all(engine, workload, plain)
            s_steps, g_steps = middle - first, counter.steps - middle
            runs.append(
                {
                    "stream_tok_s": s_tokens / s_time,
                    "generate_tok_s": g_tokens / g_time,
                    "stream_tokens": s_tokens,
                    "stream_outputs_per_request": s_outputs / len(workload),
                    "generate_tokens": g_tokens,
                    "stream_steps": s_steps,
                    "generate_steps": g_steps,
                    "stream_cpu_us_per_step": 1e6 * s_cpu / max(s_steps, 1),
                    "generate_cpu_us_per_step": 1e6 * g_cpu / max(g_steps, 1),
                }
            )
        stream_ttft, generate_ttft = await ttft(engine, workload[0], args.ttft_reps)
        breakdown = await traced(
            engine, workload, {"stream": delta, "generate": plain}, workload[0], args.ttft_reps
        )
    finally:
        engine.shutdown()
    stream_tps = statistics.median(r["stream_tok_s"] for r in runs)
    generate_tps = statistics.median(r["generate_tok_s"] for r in runs)
    stream_cpu = statistics.median(r["stream_cpu_us_per_step"] for r in runs)
    generate_cpu = statistics.median(r["generate_cpu_us_per_step"] for r in runs)
    return {
        "runs": runs,
        "stream_output_tok_s": round(stream_tps, 1),
        "generate_output_tok_s": round(generate_tps, 1),
        "stream_over_generate": round(stream_tps / generate_tps, 4),
        "stream_cpu_us_per_step": round(stream_cpu, 1),
        "generate_cpu_us_per_step": round(generate_cpu, 1),
        "stream_extra_cpu_us_per_step": round(stream_cpu - generate_cpu, 1),
        "stream_outputs_per_request": statistics.median(r["stream_outputs_per_request"] for r in runs),
        "ttft_stream_ms": round(stream_ttft * 1e3, 3),
        "ttft_generate_ms": round(generate_ttft * 1e3, 3),
        "ttft_ratio": round(stream_ttft / generate_ttft, 4),
        "targets": {"stream_over_generate": ">= 0.95", "ttft_ratio": "<= 1.05"},
        "breakdown": breakdown,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttft-reps", type=int, default=100)
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="AsyncLLM's stream_interval: a stream's output every this many tokens",
    )
    parser.add_argument(
        "--fake-device-ms",
        type=float,
        default=None,
        help="replace the model by a constant worker whose simulated device step takes this long",
    )
    parser.add_argument(
        "--fake-launch-ops",
        type=int,
        default=0,
        help="with --fake-device-ms: tiny torch calls per step's launch (each lets the GIL go, as a "
        "real launch's calls do)",
    )
    parser.add_argument(
        "--handoff-share",
        type=float,
        default=None,
        help="the wall-time share the engine thread spends on handing outputs over (kiln's default: 0.03)",
    )
    parser.add_argument(
        "--handoff-wait",
        type=float,
        default=None,
        help="seconds the engine thread waits at most for the loop to run a periodic hand-off "
        "(kiln's default: 0.002; 0: it posts and goes on)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.handoff_share is not None:
        if not args.handoff_share > 0:
            raise ValueError(f"--handoff-share must be > 0, got {args.handoff_share}")
        engine_thread.HANDOFF_SHARE = args.handoff_share
    if args.handoff_wait is not None:
        if not args.handoff_wait >= 0:
            raise ValueError(f"--handoff-wait must be >= 0, got {args.handoff_wait}")
        engine_thread.HANDOFF_WAIT = args.handoff_wait
    if args.fake_device_ms is not None and args.fake_device_ms < 0:
        raise ValueError(f"--fake-device-ms must be >= 0, got {args.fake_device_ms}")
    if args.fake_launch_ops < 0 or (args.fake_launch_ops and args.fake_device_ms is None):
        raise ValueError(
            f"--fake-launch-ops must be >= 0 and needs --fake-device-ms, got {args.fake_launch_ops}"
        )
    doc = env.collect(config=vars(args))
    doc["benchmark"] = "streaming"
    try:
        import torch

        doc["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # the environment record is best effort
        doc["gpu"] = None
    doc["results"] = asyncio.run(bench(args))
    emit_result(doc, args.out)


if __name__ == "__main__":
    main()
