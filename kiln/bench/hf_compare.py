"""The HF transformers baseline: ``generate`` on the same prompts, from the same config.

Weights are random (this compares speed, not text). Variants:

* ``eager``: dynamic cache, no compilation.
* ``static-compile``: static cache; ``generate`` compiles the forward itself on a GPU. The first call
  of each new shape compiles and is timed separately as warm-up.
"""

from __future__ import annotations

import math
import time

import torch

from kiln.bench.common import percentiles, progress, rates, sync
from kiln.bench.workload import Workload

VARIANTS = ("eager", "static-compile")


def default_variants() -> list[str]:
    return ["eager", "static-compile"] if torch.cuda.is_available() else ["eager"]


def parse_variants(value: str | None) -> list[str]:
    if not value:
        return default_variants()
    variants = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"kiln bench: unknown --hf-variants {bad}; choose from {', '.join(VARIANTS)}")
    return variants


def build_model(config: dict, dtype: torch.dtype, device: torch.device):
    """A randomly initialised HF model built on ``device`` from a config dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", None) or "llama"
    for key in ("torch_dtype", "dtype", "architectures", "transformers_version"):
        cfg.pop(key, None)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval()


def _generation_config(variant: str, new_tokens: int):
    from transformers import GenerationConfig

    kw = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        eos_token_id=None,
    )
    if variant == "static-compile":
        kw["cache_implementation"] = "static"
    return GenerationConfig(**kw)


def _batch_tensors(prompts: list[list[int]], device: torch.device):
    """Left-padded ``input_ids`` and ``attention_mask``."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _generate(model, prompts: list[list[int]], new_tokens: int, variant: str) -> tuple[float, int]:
    ids, mask = _batch_tensors(prompts, model.device)
    sync()
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=_generation_config(variant, new_tokens)
    )
    sync()
    return time.perf_counter() - t0, int(out.shape[1] - ids.shape[1])


def equal_batches(n: int, max_batch: int) -> list[tuple[int, int]]:
    """Split ``n`` items into the fewest batches of at most ``max_batch``, sizes as equal as possible."""
    count = math.ceil(n / max_batch)
    base, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def throughput(model, workload: Workload, variant: str, batch_size: int, show_progress: bool = True) -> dict:
    """Batched ``generate`` over the whole workload; tokens/s counts the tokens each request asked for."""
    reqs = workload.requests
    batches = equal_batches(len(reqs), batch_size)
    # warm-up: the first batch's exact shape (this compiles for static-compile), or a short call for eager
    lo, hi = batches[0]
    warm_prompts = [r.prompt_token_ids for r in reqs[lo:hi]]
    warm_tokens = max(r.output_len for r in reqs[lo:hi]) if variant == "static-compile" else 2
    warmup_s, _ = _generate(model, warm_prompts, warm_tokens, variant)
    elapsed = 0.0
    generated = 0
    bar = progress(total=len(reqs), disable=not show_progress, desc=f"HF {variant}")
    for lo, hi in batches:
        chunk = reqs[lo:hi]
        dt, n = _generate(
            model, [r.prompt_token_ids for r in chunk], max(r.output_len for r in chunk), variant
        )
        elapsed += dt
        generated += n * len(chunk)
        bar.update(len(chunk))
    bar.close()
    n_in, n_out = workload.num_input_tokens, workload.num_output_tokens
    return {
        "variant": variant,
        "batch_size": max(hi - lo for lo, hi in batches),
        "max_batch_size": batch_size,
        "num_batches": len(batches),
        "warmup_s": warmup_s,
        "elapsed_s": elapsed,
        **rates(len(reqs), n_in, n_out, elapsed),
        "generated_tokens": generated,
    }


def latency(
    model, prompts: list[list[int]], output_len: int, variant: str, num_iters: int, num_warmup: int
) -> dict:
    """One batch, timed whole: TTFT from a one-token ``generate``, TPOT from the full one."""
    warm = 0.0
    for _ in range(max(1, num_warmup)):
        warm += _generate(model, prompts, 1, variant)[0]
        warm += _generate(model, prompts, output_len, variant)[0]
    ttft, e2e, tpot = [], [], []
    for _ in range(num_iters):
        first, _ = _generate(model, prompts, 1, variant)
        total, _ = _generate(model, prompts, output_len, variant)
        ttft.append(first)
        e2e.append(total)
        if output_len > 1:
            tpot.append(max(0.0, total - first) / (output_len - 1))
    return {
        "variant": variant,
        "warmup_s": warm,
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles(e2e),
    }
