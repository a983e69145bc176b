"""A long soak of ``AsyncLLM`` on a GPU: 10,000 requests from 200 coroutines with random prompt lengths,
``n``, stop token ids and fates (run to the end, abort, a consumer that breaks, a cancelled task), on
random weights of a named shape (``kiln.bench.soak``; the CPU test ``tests/test_async_soak.py`` runs the
same on a tiny model with text prompts and stop strings).

    python benchmarks/async_soak.py --model llama-1b --requests 10000 --coroutines 200 \\
        --out benchmarks/results/async_soak_h200.json

Every request must end, the engine must hold no request and every KV block must be free afterwards,
and the engine must still run; the script exits 1 when one of these fails (``problems`` in the JSON).
The KV cache is kept small (``--kv-cache-memory-bytes``) so that the load preempts.
"""

import argparse
import collections
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln import AsyncLLM  # noqa: E402
from kiln.bench import env  # noqa: E402
from kiln.bench.common import emit_result  # noqa: E402
from kiln.bench.shapes import shape_config, write_shape_dir  # noqa: E402
from kiln.bench.soak import random_plans, run_soak, soak_problems  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--coroutines", type=int, default=200)
    parser.add_argument("--max-prompt", type=int, default=512, help="prompt tokens at most")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens at most")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.requests < args.coroutines or args.coroutines < 1:
        raise ValueError(f"--requests ({args.requests}) must be >= --coroutines ({args.coroutines}) >= 1")
    doc = env.collect(config=vars(args))
    doc["benchmark"] = "async_soak"
    engine = AsyncLLM(
        model=write_shape_dir(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.max_prompt + args.max_tokens + 16,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )
    try:
        rng = random.Random(args.seed)
        per = args.requests // args.coroutines
        plans = random_plans(
            rng,
            args.coroutines,
            per,
            args.max_prompt,
            args.max_tokens,
            shape_config(args.model)["vocab_size"],
        )
        result = run_soak(engine, plans, rng, settle_s=30.0)
        problems = soak_problems(engine, plans, result)
    finally:
        engine.shutdown()
    doc["results"] = {
        "requests": per * args.coroutines,
        "seconds": round(result.seconds, 3),
        "requests_per_s": round(per * args.coroutines / result.seconds, 1),
        "ended": dict(collections.Counter(result.ended.values())),
        "preemptions": result.preemptions,
        "free_blocks": result.free_blocks,
        "total_blocks": result.total_blocks,
        "problems": problems,
    }
    emit_result(doc, args.out)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
