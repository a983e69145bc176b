"""Host (CPU process) time of one ``kiln.runtime.sampler.sample`` call on ``ROWS`` rows of a ``VOCAB``-wide
logits tensor on the CPU, for plain random sampling (the bench's SamplingParams) and for greedy rows.
A tiny vocabulary keeps the tensor work small, so what remains is the per-row Python work of a step.

    python benchmarks/sampler_host.py [ROWS] [VOCAB]      (defaults 256 and 2)
"""

import statistics
import sys
import time

import torch

from kiln import SamplingParams
from kiln.runtime.sampler import SamplingRow, sample

n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 2
plain = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=256, ignore_eos=True, detokenize=False)
greedy = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
logits = torch.randn(n, vocab)
g = torch.Generator().manual_seed(0)
for name, params in (("random", plain), ("greedy", greedy)):
    rows = [SamplingRow(params.clone(), None, 10, [1, 2, 3], list(range(10))) for _ in range(n)]
    times = []
    for _ in range(5):
        t = time.process_time()
        for _ in range(200):
            sample(logits, rows, g)
        times.append((time.process_time() - t) / 200 * 1e6)
    print(f"{name}: {n} rows, {statistics.median(times):.1f} us per call (median of 5 x 200)")
