"""Benchmark workloads: token-id prompts with their output lengths.

Prompts are either synthetic (seeded random token ids, fixed or sampled lengths) or read from a JSONL
file whose lines hold ``{"prompt": text}`` or ``{"prompt_token_ids": [...]}`` and optionally
``"output_len"``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class Workload:
    requests: list[BenchRequest]
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_input_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def max_total_len(self) -> int:
        return max(len(r.prompt_token_ids) + r.output_len for r in self.requests)

    def prompts(self) -> list[dict]:
        return [{"prompt_token_ids": list(r.prompt_token_ids)} for r in self.requests]

    def sampling_params(self) -> list:
        return [sampling_params(r.output_len) for r in self.requests]


def patterned_ids(index: int, length: int, vocab_size: int) -> list[int]:
    """``length`` deterministic token ids of prompt ``index`` (no RNG, the same on every tree): ids from
    100 up, below ``min(30100, vocab_size)``, so the same ids on every large-vocabulary shape and valid
    ids on a small test vocabulary."""
    span = min(30000, vocab_size - 100)
    if span < 1:
        raise ValueError(f"vocab_size must be over 100 for patterned prompts, got {vocab_size}")
    return [(7 * index + 13 * j) % span + 100 for j in range(length)]


def sampling_params(output_len: int, temperature: float = 1.0):
    """Exactly ``output_len`` tokens (EOS ignored), plain sampling, no detokenization."""
    from kiln import SamplingParams

    return SamplingParams(
        temperature=temperature, top_p=1.0, max_tokens=output_len, ignore_eos=True, detokenize=False
    )


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    if ratio <= 0:
        return mean
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def _token_range(vocab_size: int) -> tuple[int, int]:
    # stay clear of the low ids that small vocabularies use for special tokens
    lo = min(vocab_size // 4, 1000)
    return lo, vocab_size - 1


def synthetic(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
    range_ratio: float = 0.0,
) -> Workload:
    """``num_prompts`` random token-id prompts; lengths are fixed, or uniform in
    ``[len * (1 - range_ratio), len * (1 + range_ratio)]`` when ``range_ratio > 0``."""
    if num_prompts <= 0 or input_len <= 0 or output_len <= 0:
        raise ValueError("num_prompts, input_len and output_len must be positive")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    lo, hi = _token_range(vocab_size)
    requests = []
    for _ in range(num_prompts):
        n_in = _length(rng, input_len, range_ratio)
        n_out = _length(rng, output_len, range_ratio)
        requests.append(BenchRequest([rng.randint(lo, hi) for _ in range(n_in)], n_out))
    return Workload(
        requests,
        {
            "kind": "synthetic",
            "num_prompts": num_prompts,
            "input_len": input_len,
            "output_len": output_len,
            "range_ratio": range_ratio,
            "seed": seed,
        },
    )


def from_jsonl(
    path: str, vocab_size: int, output_len: int, tokenizer=None, num_prompts: int | None = None, seed: int = 0
) -> Workload:
    """Prompts from a JSONL file. Text prompts need ``tokenizer``; lines without ``output_len`` get
    ``output_len``. With ``num_prompts`` the file is cycled or cut to that many requests."""
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from e
            if isinstance(item, str):
                item = {"prompt": item}
            if "prompt_token_ids" in item:
                ids = [int(t) for t in item["prompt_token_ids"]]
            elif "prompt" in item:
                if tokenizer is None:
                    raise ValueError(
                        f"{path}:{lineno}: text prompts need a tokenizer: pass --tokenizer DIR, or give "
                        "prompt_token_ids"
                    )
                ids = tokenizer(item["prompt"])["input_ids"]
            else:
                raise ValueError(f"{path}:{lineno}: expected a 'prompt' or 'prompt_token_ids' field")
            if not ids:
                raise ValueError(f"{path}:{lineno}: empty prompt")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"{path}:{lineno}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})"
                )
            n_out = int(item.get("output_len", output_len))
            if n_out <= 0:
                raise ValueError(f"{path}:{lineno}: output_len must be positive")
            requests.append(BenchRequest(ids, n_out))
    if not requests:
        raise ValueError(f"{path}: no prompts")
    if num_prompts is not None:
        requests = [requests[i % len(requests)] for i in range(num_prompts)]
    return Workload(
        requests,
        {
            "kind": "jsonl",
            "path": path,
            "num_prompts": len(requests),
            "output_len_default": output_len,
            "seed": seed,
        },
    )
