"""Checks and tokenizes each request before anything runs, as vLLM's input processor does: prompt forms,
tokenization arguments, lengths against ``max_model_len``, token ids against the vocabulary, logprob
limits, priorities. Every error is a ``ValueError`` (``NotImplementedError`` for features kiln does not
have) naming the prompt and the field."""

from dataclasses import dataclass
from typing import Any

from kiln.runtime.config import EngineConfig
from kiln.runtime.inputs import parse_prompt
from kiln.runtime.sampling_params import SamplingParams

TOKENIZATION_KWARGS = ("add_special_tokens", "truncation", "max_length", "padding", "pad_to_multiple_of")
_MULTIMODAL_KEYS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids")


@dataclass
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    cache_salt: str | None = None


def as_prompt_list(prompts: Any) -> list:
    """One prompt or a sequence of them, as a non-empty list."""
    if isinstance(prompts, (str, dict)) or _is_token_list(prompts):
        return [prompts]
    if prompts is None or isinstance(prompts, bytes) or not hasattr(prompts, "__iter__"):
        raise ValueError(
            "prompts must be a str, a TextPrompt / TokensPrompt dict, a list of token ids, or a list of "
            f"these; got {type(prompts).__name__}"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: the list of prompts is empty")
    return prompts


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def check_tokenization_kwargs(kwargs: dict | None) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"tokenization_kwargs must be a dict, got {kwargs!r}")
    unknown = sorted(set(kwargs) - set(TOKENIZATION_KWARGS))
    if unknown:
        raise ValueError(
            f"tokenization_kwargs: unknown key(s) {unknown}; kiln passes {list(TOKENIZATION_KWARGS)}"
        )
    return dict(kwargs)


def check_priorities(priority: Any, num_prompts: int, policy: str) -> list[int]:
    if priority is None:
        return [0] * num_prompts
    priority = list(priority)
    if len(priority) != num_prompts:
        raise ValueError(f"priority: got {len(priority)} values for {num_prompts} prompts")
    for p in priority:
        if not isinstance(p, int) or isinstance(p, bool):
            raise ValueError(f"priority must hold ints, got {p!r}")
        if p != 0 and policy != "priority":
            raise ValueError(
                f"priority: got priority {p} but priority scheduling is not enabled "
                "(LLM(scheduling_policy='priority'))"
            )
    return priority


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, config: EngineConfig):
        self.tokenizer, self.vocab_size, self.config = tokenizer, vocab_size, config

    def check_params(self, params: SamplingParams, index: int) -> None:
        """Token ids inside ``params`` must be in the vocabulary; logprobs within ``max_logprobs``."""
        vocab = self.vocab_size
        named = {
            "logit_bias": list(params.logit_bias or ()),
            "allowed_token_ids": list(params.allowed_token_ids or ()),
            "stop_token_ids": list(params.stop_token_ids or ()),
        }
        for name, ids in named.items():
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"sampling_params[{index}].{name}: token ids {bad[:5]} are outside the "
                    f"vocabulary [0, {vocab})"
                )
        limit = vocab if self.config.max_logprobs == -1 else self.config.max_logprobs
        for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
            value = getattr(params, name)
            if value is None:
                continue
            asked = vocab if value == -1 else value
            if asked > limit:
                raise ValueError(
                    f"sampling_params[{index}].{name}: requested {kind} logprobs of {asked}, "
                    "which is greater "
                    f"than max allowed: {limit} (LLM(max_logprobs=...), -1 for the whole vocabulary)"
                )
            if asked > vocab:
                raise ValueError(
                    f"sampling_params[{index}].{name}={value} exceeds the vocabulary size ({vocab})"
                )
        trunc = params.truncate_prompt_tokens
        if trunc is not None and trunc > self.config.max_model_len:
            raise ValueError(
                f"sampling_params[{index}].truncate_prompt_tokens={trunc} is greater than max_model_len "
                f"({self.config.max_model_len}); select a smaller truncation size"
            )

    def process(
        self, prompt: Any, index: int, params: SamplingParams, tokenization_kwargs: dict
    ) -> ProcessedPrompt:
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = {"prompt_token_ids": prompt}
        parsed = parse_prompt(prompt)
        for key in _MULTIMODAL_KEYS:
            if parsed.get(key) is not None:
                raise NotImplementedError(
                    f"prompt {index}: {key!r} is not supported: kiln has no multimodal models"
                )
        if parsed.get("prompt_embeds") is not None:
            raise NotImplementedError(
                f"prompt {index}: 'prompt_embeds' is not supported (token ids or text only)"
            )
        salt = parsed.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError(f"prompt {index}: cache_salt must be a non-empty str, got {salt!r}")
        if "prompt_token_ids" in parsed:
            text, ids = parsed.get("prompt"), list(parsed["prompt_token_ids"])
        else:
            text = parsed["prompt"]
            if self.tokenizer is None:
                raise ValueError(f"prompt {index}: text prompts need a tokenizer (skip_tokenizer_init=True)")
            ids = list(
                self.tokenizer(text, **{"add_special_tokens": True, **tokenization_kwargs})["input_ids"]
            )
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {index}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        max_len = self.config.max_model_len
        trunc = params.truncate_prompt_tokens
        if trunc is not None:
            ids = ids[-(max_len if trunc == -1 else trunc) :]
        if len(ids) > max_len:  # vLLM's two messages: longer than the context, or leaving no output room
            raise ValueError(
                f"prompt {index}: the decoder prompt (length {len(ids)}) is longer than the maximum model "
                f"length of {max_len}"
            )
        if len(ids) == max_len:
            raise ValueError(
                f"prompt {index}: the decoder prompt (length {len(ids)}) plus the number of requested output "
                f"tokens (at least 1) is longer than the maximum model length of {max_len}"
            )
        return ProcessedPrompt(text, ids, salt)
