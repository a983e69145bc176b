"""How fast a step's grammar bitmask fills on this host, by the ways a fill can be spread over threads.

    python benchmarks/grammar_fill.py [--tokenizer DIR] [--rows 64] [--steps 96] [--out FILE]

``--rows`` xgrammar matchers of ``structured.py``'s schema are advanced, each by its own number of
random tokens that its grammar allows (up to ``--steps``), so the rows sit in the states a random
model's outputs reach (inside strings, numbers, between records). Then one step's bitmask is filled
over and over, each way timed by its median over ``--repeats`` fills:

* ``native_<k>``: one call of xgrammar's ``BatchGrammarMatcher(max_threads=k)`` (its C++ threads);
* ``pool_<k>``: the rows dealt over ``k`` Python threads (the caller's included), each running a
  single-threaded ``BatchGrammarMatcher`` with the GIL released, the caller waiting for the others;
* ``overlap_<k>``: as ``pool_<k>`` with every share on a helper thread, while the caller runs pure
  Python for as long as one thread's fill takes before it waits: how much of the fill a step can hide
  behind its own Python work;
* ``handoff``: the whole fill on ``kiln.structured.fill_thread.FillThread`` beside the same Python work
  (the engine's way); ``serial`` is that Python work and the fill one after the other.

Writes the JSON result (host, cores, per-row cost, every way's median in us) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kiln.bench import common, env  # noqa: E402
from kiln.structured.fill_thread import FillThread  # noqa: E402


def advanced_matchers(xgr, compiled, vocab: int, rows: int, steps: int, seed: int):
    import torch

    rng = random.Random(seed)
    words = (vocab + 31) // 32
    bits = torch.empty(1, words, dtype=torch.int32)
    matchers = []
    for _ in range(rows):
        m = xgr.GrammarMatcher(compiled)
        for _ in range(rng.randrange(steps + 1)):
            m.fill_next_token_bitmask(bits)
            allowed = [
                t for t in rng.sample(range(vocab), 512) if (int(bits[0, t >> 5]) >> (t & 31)) & 1
            ] or [t for t in range(vocab) if (int(bits[0, t >> 5]) >> (t & 31)) & 1]
            token = rng.choice(allowed)
            if not m.accept_token(token) or m.is_terminated():
                break
        matchers.append(m)
    return matchers


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=os.environ.get("KILN_TEST_TOKENIZER_DIR"))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", default="2,4,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.tokenizer:
        ap.error("--tokenizer (or KILN_TEST_TOKENIZER_DIR) is needed")
    import torch
    import xgrammar as xgr
    from structured import BENCH_SCHEMA
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = max(tokenizer.get_vocab().values()) + 1
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(BENCH_SCHEMA))
    matchers = advanced_matchers(xgr, compiled, vocab, args.rows, args.steps, args.seed)
    handles = [m._handle for m in matchers]
    rows = list(range(len(handles)))
    bitmask = torch.empty(len(handles), (vocab + 31) // 32, dtype=torch.int32)
    threads = [int(k) for k in args.threads.split(",")]
    fillers = [xgr.BatchGrammarMatcher(max_threads=1)._handle for _ in range(max(threads))]

    def share(j: int, k: int):
        return fillers[j].batch_fill_next_token_bitmask, handles[j::k], bitmask, rows[j::k], False

    def fill_one():
        fillers[0].batch_fill_next_token_bitmask(handles, bitmask, rows, False)

    result = {"rows": len(handles), "vocab": vocab, "threads": threads, "us": {}}
    one = result["us"]["native_1"] = median_us(fill_one, args.repeats)
    result["us_per_row"] = one / len(handles)
    pool = ThreadPoolExecutor(max(threads), thread_name_prefix="fill")
    for k in threads:
        native = xgr.BatchGrammarMatcher(max_threads=k)._handle
        result["us"][f"native_{k}"] = median_us(
            lambda n=native: n.batch_fill_next_token_bitmask(handles, bitmask, rows, False), args.repeats
        )

        def shared(k=k):
            futures = [pool.submit(*share(j, k)) for j in range(1, k)]
            fillers[0].batch_fill_next_token_bitmask(handles[::k], bitmask, rows[::k], False)
            for f in futures:
                f.result()

        result["us"][f"pool_{k}"] = median_us(shared, args.repeats)

        def overlap(k=k):
            futures = [pool.submit(*share(j, k)) for j in range(k)]
            busy(one * 1e-6)
            for f in futures:
                f.result()

        result["us"][f"overlap_{k}"] = median_us(overlap, args.repeats)
    helper = FillThread()

    def handoff():
        helper.start(fill_one)
        busy(one * 1e-6)
        helper.result()

    result["us"]["handoff"] = median_us(handoff, args.repeats)
    helper.shutdown()
    result["us"]["serial"] = median_us(lambda: (busy(one * 1e-6), fill_one()), args.repeats)
    pool.shutdown()
    result["switch_interval_s"] = sys.getswitchinterval()
    result["active_threads_after"] = threading.active_count()
    for name, us in result["us"].items():
        print(f"{name:>12}: {us:8.1f} us")
    print(f"a row: {result['us_per_row']:.2f} us over {len(handles)} rows")
    if args.out:
        doc = env.collect(argv, {"tokenizer": args.tokenizer, "schema": "structured.BENCH_SCHEMA"})
        doc.update(benchmark="grammar_fill", results=result)
        common.save_result(doc, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
