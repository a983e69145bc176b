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

``--structured --tokenizer DIR`` times the host side of JSON-schema constrained steps (the schema of
``structured.py``): ``--num-prompts`` requests, ``--max-num-seqs`` at a time, each step's grammar
bitmask over a ``--vocab-size`` (128,256: Llama 3's) vocabulary filled by the engine, its matchers
advanced by the tokens read back, against a worker that samples a pseudo-random allowed token from the
mask at once (its own CPU time is measured and left out); the same run unconstrained beside it.
``--grow-tokenizer N`` first grows the tokenizer to N tokens (concatenations of two of its own tokens,
seeded): a stand-in for a tokenizer as large as Llama 3's, whose masks cost more per row. It also
times, outside the engine, a 64-row fill in 1, 2 and 4 shares and a fill handed to another thread
while the caller runs Python (``fill_split`` in the JSON): what handing rows to threads costs here.
``--grammar-parts --tokenizer DIR`` times the grammar work of one step of ``--max-num-seqs`` rows alone
(``token_mask`` and the matchers' ``accept``), min and median of 400.
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
import types

import numpy as np
import torch

from kiln.bench.constant_worker import ConstantWorker, DeviceClock
from kiln.runtime.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_data import RunnerOutput, SchedulerOutput


class GrammarWorker(ConstantWorker):
    """Defers sampling like the real worker: ``sample_deferred`` picks a pseudo-random allowed token
    of each constrained row from the host bitmask (a stop token only when nothing else is allowed),
    token 7 for the other rows. ``cpu`` holds its own CPU seconds, which the measurement leaves out.

    With ``step_seconds`` > 0 it stands in for a device (as ``ConstantWorker`` does): a step's forward
    takes ``step_seconds - sampler_seconds`` from its launch (or from the end of the device's earlier
    work), its sampler ``sampler_seconds`` from the later of the forward's end and ``sample_deferred``
    (an undeferred step: both at once, ``step_seconds`` in all). The pick's own time is taken out of
    the simulated timeline too (the device's work ends that much later, and the wall time the run
    reports leaves it out), as if the device had picked the tokens."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        stop_token_ids: list[int],
        seed: int = 0,
        step_seconds: float = 0.0,
        sampler_seconds: float = 0.0,
    ):
        if not 0 <= sampler_seconds <= step_seconds or (step_seconds == 0 and sampler_seconds):
            raise ValueError(
                f"sampler_seconds must be in [0, step_seconds={step_seconds}], got {sampler_seconds}"
            )
        super().__init__(num_blocks, block_size, step_seconds)
        self.sampler_seconds = sampler_seconds
        self.stop_token_ids, self.rng = stop_token_ids, np.random.default_rng(seed)
        self.deferred: RunnerOutput | None = None
        self.cpu = 0.0  # CPU seconds of the picks
        self.wall = 0.0  # wall seconds of the picks
        self.rows = 0  # sampled rows over all steps

    def execute_model(self, out: SchedulerOutput) -> RunnerOutput:
        if not out.defer_sampling:
            result = super().execute_model(out)
            self.rows += len(result.seq_ids)
            return result
        self.steps += 1
        ids = [s.seq_id for s in out.scheduled if s.sample]
        self.rows += len(ids)
        if self.step_seconds:  # the forward alone; the sampler is launched by sample_deferred
            start = max(time.perf_counter(), self._device_free_at)
            self._device_free_at = start + self.step_seconds - self.sampler_seconds
        self.deferred = RunnerOutput(ids, None, [None] * len(ids), {})
        return self.deferred

    def sample_deferred(self, grammar_bitmask) -> None:
        t0, wall0 = time.process_time(), time.perf_counter()
        result, self.deferred = self.deferred, None
        tokens = [7] * len(result.seq_ids)
        if grammar_bitmask is not None:
            for j, i in enumerate(grammar_bitmask.rows):
                tokens[i] = self._pick(grammar_bitmask.bitmask[j].numpy().view(np.uint32).copy())
        result.tokens = torch.tensor(tokens)
        self.cpu += time.process_time() - t0
        picked = time.perf_counter() - wall0
        self.wall += picked
        if self.step_seconds:
            self._device_free_at += picked  # the pick is the device's: the host never waited for it
            done = max(time.perf_counter(), self._device_free_at) + self.sampler_seconds
            self._device_free_at = done
            result.host_tokens, result.ready = result.tokens, DeviceClock(done)

    def _pick(self, words: np.ndarray) -> int:
        kept = words.copy()
        for t in self.stop_token_ids:
            words[t >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (t & 31)))
        if not words.any():
            words = kept
        nonzero = np.flatnonzero(words)
        w = int(nonzero[self.rng.integers(len(nonzero))])
        bits = [b for b in range(32) if int(words[w]) >> b & 1]
        return 32 * w + bits[int(self.rng.integers(len(bits)))]


def grown_tokenizer(path: str, size: int) -> str:
    """A copy of the byte-level BPE tokenizer at ``path`` with ``size`` tokens: the new ones are
    concatenations of two of its tokens (never produced by its merges, but masked like any other)."""
    import random
    import shutil
    import tempfile

    out = tempfile.mkdtemp(prefix="kiln-grown-tokenizer-")
    with open(os.path.join(path, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)[100:]  # past the special and single-byte tokens
    rng = random.Random(0)
    while len(vocab) < size:
        vocab.setdefault(rng.choice(tokens) + rng.choice(tokens), len(vocab))
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    shutil.copy(os.path.join(path, "tokenizer_config.json"), out)
    return out


def time_structured(config: EngineConfig, blocks: int, args, constrained: bool) -> dict:
    """Engine CPU seconds (the worker's left out) over a whole run of ``--num-prompts`` requests."""
    import transformers

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from structured import BENCH_SCHEMA

    from kiln import StructuredOutputsParams

    path = (
        args.tokenizer
        if args.grow_tokenizer is None
        else grown_tokenizer(args.tokenizer, args.grow_tokenizer)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model_config = types.SimpleNamespace(eos_token_id=[tokenizer.eos_token_id], vocab_size=args.vocab_size)
    step_s = 1e-3 * (args.fake_device_ms or 0.0)
    sampler_s = min(1e-3 * args.fake_sampler_ms, step_s)
    worker = GrammarWorker(blocks, args.block_size, [tokenizer.eos_token_id], 0, step_s, sampler_s)
    engine = LLMEngine(config, model_config, tokenizer, worker=worker)
    so = StructuredOutputsParams(json=BENCH_SCHEMA) if constrained else None
    params = SamplingParams(
        max_tokens=args.output_len, ignore_eos=not constrained, detokenize=False, structured_outputs=so
    )
    engine.structured.backend("xgrammar")  # the vocabulary table: once per engine, not per step
    for i in range(args.num_prompts):
        prompt = [(i * 7919 + j * 104729) % 30000 + 10 for j in range(args.input_len)]
        engine.add_request(str(i), None, prompt, params)
    while any(not s.grammar.ready for s in engine.scheduler.waiting if s.grammar is not None):
        time.sleep(0.01)
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    t0, wall0 = time.process_time(), time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    cpu, wall = time.process_time() - t0 - worker.cpu, time.perf_counter() - wall0 - worker.wall
    if profile is not None:
        profile.disable()
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)
    engine.structured.shutdown()
    steps, rows = worker.steps, worker.rows
    return {
        "steps": steps,
        "sampled_rows": rows,
        "cpu_us_per_step": round(1e6 * cpu / steps, 1),
        "wall_us_per_step": round(1e6 * wall / steps, 1),
        "cpu_us_per_sampled_row": round(1e6 * cpu / max(rows, 1), 2),
    }


def time_xgrammar_pool(tokenizer_path: str, vocab_size: int, repeats: int = 200) -> dict:
    """CPU and wall us of filling one bitmask row (a matcher inside a JSON string) through xgrammar's
    ``BatchGrammarMatcher()`` (its "auto" pool: hardware threads / 2, started on every call), one of
    two threads and a single-threaded one (what kiln's fill runs), at xgrammar's vocabulary of the
    tokenizer."""
    import transformers
    import xgrammar as xgr

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from structured import BENCH_SCHEMA

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    size = min(vocab_size, len(tokenizer))
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=size, stop_token_ids=[tokenizer.eos_token_id]
    )
    compiled = xgr.GrammarCompiler(info).compile_grammar(
        xgr.Grammar.from_json_schema(json.dumps(BENCH_SCHEMA))
    )
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string('{"items": [{"name": "ab')
    bitmask = torch.zeros(1, -(-size // 32), dtype=torch.int32)
    out = {"xgrammar_auto_threads": (os.cpu_count() or 2) // 2}
    for name, batch in (
        ("xgrammar_auto", xgr.BatchGrammarMatcher()),
        ("two_threads", xgr.BatchGrammarMatcher(2)),
        ("single_thread", xgr.BatchGrammarMatcher(1)),
    ):
        t0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            batch.batch_fill_next_token_bitmask([matcher], bitmask, [0])
        out[f"{name}_cpu_us"] = round(1e6 * (time.process_time() - t0) / repeats, 1)
        out[f"{name}_wall_us"] = round(1e6 * (time.perf_counter() - wall0) / repeats, 1)
    return out


def wall_times(fn, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_fill_split(tokenizer_path: str, vocab_size: int, rows: int = 64, repeats: int = 200) -> dict:
    """Wall us (median of ``repeats``) of kiln's fill of ``rows`` matchers inside a JSON string (the
    schema of ``structured.py``) in 1, 2 and 4 shares (forced, whatever ``fill_shares`` would pick),
    and of one fill handed to another thread while the engine's thread runs Python (a busy loop of
    0 or 200 us) against the same done serially: what a hand-off costs on this host, GIL included."""
    from concurrent.futures import ThreadPoolExecutor

    import transformers

    from kiln.structured.xgrammar_backend import MIN_SHARE_US, XGrammarBackend

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from structured import BENCH_SCHEMA

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    import xgrammar as xgr

    backend = XGrammarBackend(tokenizer, vocab_size, [tokenizer.eos_token_id])
    backend.fillers = [xgr.BatchGrammarMatcher(max_threads=1)._handle for _ in range(4)]
    backend.pool = ThreadPoolExecutor(3, thread_name_prefix="kiln-grammar")  # room for 4 shares

    compiled = backend.compile(xgr.Grammar.from_json_schema(json.dumps(BENCH_SCHEMA)))
    matchers = [backend.matcher(compiled) for _ in range(rows)]
    for m in matchers:
        assert m.matcher.accept_string('{"items": [{"name": "ab')
    bitmask = torch.empty(rows, backend.words, dtype=torch.int32)
    indices = list(range(rows))

    def median_us(fn) -> float:
        return round(1e6 * statistics.median(wall_times(fn, repeats)), 1)

    out = {"rows": rows, "grammar_vocab_size": backend.vocab_size}
    for shares in (1, 2, 4):

        def fill(shares=shares):
            backend.threads, backend.us_per_row = shares, MIN_SHARE_US  # forces the shares
            backend.fill_bitmask(matchers, bitmask, indices)

        out[f"fill_{shares}_shares_wall_us"] = median_us(fill)
    handles, filler = [m.handle for m in matchers], backend.fillers[0]
    pool = ThreadPoolExecutor(1)

    def busy(us: float) -> None:
        end = time.perf_counter() + 1e-6 * us
        while time.perf_counter() < end:
            pass

    for us in (0, 200):
        out[f"serial_fill_then_{us}us_python_wall_us"] = median_us(
            lambda us=us: (filler.batch_fill_next_token_bitmask(handles, bitmask, indices, False), busy(us))
        )

        def overlapped(us=us):
            future = pool.submit(filler.batch_fill_next_token_bitmask, handles, bitmask, indices, False)
            busy(us)
            future.result()

        out[f"fill_on_a_thread_beside_{us}us_python_wall_us"] = median_us(overlapped)
    pool.shutdown()
    backend.shutdown()
    return out


def time_grammar_parts(tokenizer_path: str, vocab_size: int, rows: int, repeats: int = 400) -> dict:
    """Wall us (min and median of ``repeats``) of the engine's grammar work of one step of ``rows``
    constrained rows whose matchers are inside a JSON string (the schema of ``structured.py``):
    ``StructuredOutputManager.token_mask`` (the bitmask, filled), and ``GrammarState.accept`` of one
    token a row (then a ``rollback(1)`` a row, timed alone too: subtract it)."""

    import transformers

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from structured import BENCH_SCHEMA

    from kiln import StructuredOutputsParams
    from kiln.structured.manager import StructuredOutputManager
    from kiln.structured.params import StructuredOutputsConfig

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    manager = StructuredOutputManager(
        StructuredOutputsConfig(), tokenizer, vocab_size, [tokenizer.eos_token_id], torch.device("cpu")
    )
    params = SamplingParams(max_tokens=256, structured_outputs=StructuredOutputsParams(json=BENCH_SCHEMA))
    seqs = []
    for _ in range(rows):
        state = manager.new_state(params)
        while not state.ready:
            time.sleep(0.01)
        assert state.matcher.matcher.accept_string('{"items": [{"name": "ab')
        seqs.append(types.SimpleNamespace(grammar=state, params=params, output_token_ids=[1] * 10))
    token = tokenizer.convert_tokens_to_ids("a")  # inside a string: always allowed

    def accept():
        for s in seqs:
            s.grammar.accept(token)
        for s in seqs:
            s.grammar.matcher.matcher.rollback(1)

    def rollback():
        for s in seqs:
            s.grammar.matcher.matcher.rollback(0)

    out = {"rows": rows}
    for name, fn in (("token_mask", lambda: manager.token_mask(seqs)), ("accept_and_rollback", accept),
                     ("rollback", rollback)):  # fmt: skip
        times = wall_times(fn, repeats)
        out[f"{name}_min_us"] = round(1e6 * min(times), 1)
        out[f"{name}_median_us"] = round(1e6 * statistics.median(times), 1)
    manager.shutdown()
    return out


def time_runner_prepare(rows: int, repeats: int = 300) -> float:
    """CPU seconds of one ``ModelRunner._prepare`` over a decode step of ``rows`` sequences."""
    from kiln.ops.attention_backend import AttentionBackend
    from kiln.runtime.model_runner import ModelRunner
    from kiln.runtime.step_data import ScheduledSequence

    try:  # the block tables as the engine's sequences hold them (int32 arrays; lists before)
        from kiln.runtime.sequence import block_table
    except ImportError:
        block_table = list
    p = SamplingParams()
    out = SchedulerOutput(
        [
            ScheduledSequence(i, [5], 300 + i % 40, 1, False, block_table(range(i * 32, i * 32 + 24 + i % 8)),
                              True, p, 10, [], [])
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
    ap.add_argument(
        "--structured", action="store_true", help="JSON-schema constrained steps (needs --tokenizer)"
    )
    ap.add_argument("--tokenizer", default=None, help="with --structured: a Hugging Face tokenizer directory")
    ap.add_argument(
        "--vocab-size", type=int, default=128256, help="with --structured: the model's vocabulary"
    )
    ap.add_argument("--grow-tokenizer", type=int, default=None, help="with --structured: grow it to N tokens")
    ap.add_argument(
        "--fake-device-ms",
        type=float,
        default=None,
        help="with --structured: a simulated device step of this many ms (reading a step back sleeps until "
        "it is done), so the wall time shows what host work is not overlapped with the device",
    )
    ap.add_argument(
        "--fake-sampler-ms",
        type=float,
        default=0.05,
        help="with --fake-device-ms: the part of the step that is the sampler, which a constrained step "
        "launches only once its grammar mask is filled",
    )
    ap.add_argument("--no-fill-extras", action="store_true", help="with --structured: skip the fill timings")
    ap.add_argument(
        "--grammar-parts",
        action="store_true",
        help="time token_mask and accept of one step (needs --tokenizer)",
    )
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.fake_device_ms is not None and args.fake_device_ms < 0:
        raise ValueError(f"--fake-device-ms must be >= 0, got {args.fake_device_ms}")
    if not 0 <= args.fake_sampler_ms:
        raise ValueError(f"--fake-sampler-ms must be >= 0, got {args.fake_sampler_ms}")
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
    if args.grammar_parts:
        if args.tokenizer is None:
            raise SystemExit("--grammar-parts needs --tokenizer DIR")
        result = {
            "command": f"python benchmarks/host_step.py --grammar-parts --tokenizer DIR --max-num-seqs "
            f"{args.max_num_seqs} --vocab-size {args.vocab_size}",
            **time_grammar_parts(args.tokenizer, args.vocab_size, args.max_num_seqs),
        }
        print(json.dumps(result))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
        return
    if args.structured:
        if args.tokenizer is None:
            raise SystemExit("--structured needs --tokenizer DIR")
        from kiln.bench import env
        from kiln.structured.xgrammar_backend import grammar_threads

        runs = {"constrained": [], "unconstrained": []}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(time_structured(config, blocks, args, kind == "constrained"))
        # the run of median CPU time per step, of each kind
        median = {k: sorted(v, key=lambda r: r["cpu_us_per_step"])[len(v) // 2] for k, v in runs.items()}
        wall = {k: statistics.median(r["wall_us_per_step"] for r in v) for k, v in runs.items()}
        rate = {k: statistics.median(r["sampled_rows"] / r["wall_us_per_step"] / r["steps"] for r in v)
                for k, v in runs.items()}  # fmt: skip
        result = {
            "command": "python benchmarks/host_step.py "
            + " ".join(
                f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                for k, v in vars(args).items()
                if v is not None and v is not False
            ),
            "runs": runs,
            "median": median,
            "constrained_extra_cpu_us_per_step": round(
                median["constrained"]["cpu_us_per_step"] - median["unconstrained"]["cpu_us_per_step"], 1
            ),
            # medians over the runs of each kind: wall time per step, and sampled rows per wall second
            "median_wall_us_per_step": wall,
            "constrained_over_unconstrained_wall_per_step": round(
                wall["constrained"] / wall["unconstrained"], 4
            ),
            "constrained_over_unconstrained_rows_per_s": round(
                rate["constrained"] / rate["unconstrained"], 4
            ),
            "machine": env.machine_info(),
            "versions": {**env.versions(), "xgrammar": env._version("xgrammar")},
            "grammar_threads": grammar_threads(),
        }
        if not args.no_fill_extras:
            result["one_row_fill"] = time_xgrammar_pool(args.tokenizer, args.vocab_size)
            result["fill_split"] = time_fill_split(args.tokenizer, args.vocab_size)
        print(json.dumps(result, indent=1))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
        return
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
