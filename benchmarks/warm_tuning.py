"""Does a start re-run Inductor's tuning? Autotune-cache hits/misses and coordinate-descent runs of one start.

    KILN_CACHE_DIR=/tmp/k python benchmarks/warm_tuning.py --model llama-1b   # run it twice or more

Starts one LLM with the batch-1 latency setting (``compile_sizes=[1]``), counts how Inductor's autotune
cache answered each Triton kernel and how many kernels ran coordinate descent, then prints start-up and
batch-1 TPOT (256 tokens after a 128-token prompt, temperature 1). Run it again with the same
``KILN_CACHE_DIR``: a warm start should show only hits and no coordinate-descent runs. Needs CUDA.
"""

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch._inductor.runtime.triton_heuristics as heuristics  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.bench.shapes import write_shape_dir  # noqa: E402

STATS: collections.Counter = collections.Counter()


def _count_cache_answers():
    check = heuristics.check_autotune_cache

    def counted(configs, filename, inductor_meta):
        result = check(configs, filename, inductor_meta)
        STATS["autotune cache " + result[2].get("autotune_cache_state", "unused")] += 1
        return result

    heuristics.check_autotune_cache = counted
    tune = heuristics.CachingAutotuner._coordinate_descent_tuning

    def counted_tune(self, launcher, *args, **kwargs):
        STATS["coordinate-descent runs"] += 1
        return tune(self, launcher, *args, **kwargs)

    heuristics.CachingAutotuner._coordinate_descent_tuning = counted_tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b")
    args = parser.parse_args()
    _count_cache_answers()
    start = time.perf_counter()
    llm = LLM(
        write_shape_dir(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        compilation_config={"compile_sizes": [1]},
        max_model_len=512,
        gpu_memory_utilization=0.9,
    )
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=1.0, max_tokens=256, ignore_eos=True, detokenize=False)
    prompt = {"prompt_token_ids": list(range(100, 228))}
    llm.generate([prompt], params, use_tqdm=False)
    metrics = llm.generate([prompt], params, use_tqdm=False)[0].metrics
    tpot = (metrics.finished_time - metrics.first_token_time) / 255 * 1e3
    print(f"{args.model}: start-up {startup:.1f} s, TPOT {tpot:.3f} ms, {dict(STATS)}")


if __name__ == "__main__":
    main()
