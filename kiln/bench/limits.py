"""What the GPU can do for a workload: model FLOPs and K/V bytes, a dense GEMM's rate and the read
bandwidth measured now.

``forward_flops`` counts the matrix products of a Llama-family forward (projections, MLP, attention
scores and values, and the LM head when asked) for prompts of one length; ``kv_read_bytes`` the K and V
a request's decode steps read from the cache; ``gemm_tflops`` times a large matmul on the device and
``read_bandwidth`` one full read of a large buffer, the bounds a benchmark compares itself with in the
same run.
"""

from __future__ import annotations

import time

import torch

from kiln.bench import common


def forward_flops(config: dict, prompt_len: int, num_prompts: int = 1, lm_head_rows: int = 0) -> int:
    """FLOPs (2 per multiply-add) of a causal forward over ``num_prompts`` prompts of ``prompt_len``
    tokens, plus ``lm_head_rows`` rows of logits."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = _attention_shape(config)
    per_token = (
        2 * h * head_dim * (2 * heads + 2 * kv_heads) + 2 * 3 * h * inter
    )  # q, o, k, v; gate, up, down
    tokens = prompt_len * num_prompts
    # causal attention: token i attends to i + 1 positions; QK^T and PV are 2 * head_dim FLOPs each per pair
    pairs = num_prompts * prompt_len * (prompt_len + 1) // 2
    attention = 4 * heads * head_dim * pairs
    layers = config["num_hidden_layers"]
    return layers * (per_token * tokens + attention) + 2 * h * config["vocab_size"] * lm_head_rows


def _attention_shape(config: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a Llama-family config."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    return heads, kv_heads, config.get("head_dim") or config["hidden_size"] // heads


def kv_bytes_per_token(config: dict, elem_bytes: int) -> int:
    _, kv_heads, head_dim = _attention_shape(config)
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * elem_bytes


def kv_read_bytes(config: dict, prompt_len: int, output_len: int, elem_bytes: int) -> int:
    """K and V bytes one request's decode steps read: the step that samples output token ``j`` (2 to
    ``output_len``; the first comes from the prompt's step) attends over ``prompt_len + j - 1`` positions."""
    steps = max(output_len - 1, 0)
    positions = steps * prompt_len + steps * (steps + 1) // 2
    return positions * kv_bytes_per_token(config, elem_bytes)


def read_bandwidth(device: torch.device, nbytes: int = 2**30, iters: int = 10) -> float:
    """Best-of-``iters`` bytes/s of one full read of an ``nbytes`` buffer (``torch.sum``)."""
    if device.type == "cpu":
        nbytes = min(nbytes, 2**28)
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buf.sum()
    best = float("inf")
    for _ in range(iters):
        common.sync()
        start = time.perf_counter()
        buf.sum()
        common.sync()
        best = min(best, time.perf_counter() - start)
    del buf
    return nbytes / best


@torch.inference_mode()
def gemm_tflops(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, iters: int = 20
) -> float:
    """Dense ``n x n x n`` matmul rate in TFLOP/s on ``device`` (the best of ``iters`` timed runs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(iters + 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            seconds = time.perf_counter() - t0
        if i >= 3:  # the first runs pick the kernel and warm the clocks
            best = min(best, seconds)
    return 2 * n**3 / best / 1e12
