"""Per-request generation settings: ``SamplingParams`` and the enums it uses.

``SamplingParams`` is built with keyword arguments, checks every value when it is created and
raises ``ValueError`` naming the field and the bad value. A few fields are normalised on the way in:

* ``stop`` and ``stop_token_ids`` always end up as lists (``None`` becomes ``[]``, a single string
  becomes a one-element list);
* ``top_k=-1`` becomes ``0`` (both mean "no top-k limit");
* ``seed=-1`` becomes ``None``; ``logprobs=True`` becomes ``1`` and ``logprobs=False`` becomes ``None``
  (likewise for ``prompt_logprobs``);
* greedy requests (temperature below ``SAMPLING_EPS``) get ``top_p=1``, ``top_k=0`` and ``min_p=0``,
  because those filters cannot change an argmax;
* a temperature in ``[SAMPLING_EPS, MIN_RANDOM_TEMPERATURE)`` is raised to ``MIN_RANDOM_TEMPERATURE``
  with a warning, since dividing logits by a tiny number overflows.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import Any

logger = logging.getLogger(__name__)

SAMPLING_EPS = 1e-5
"""Temperatures below this are treated as greedy (argmax) decoding."""

MIN_RANDOM_TEMPERATURE = 1e-2
"""Smallest temperature used for random sampling; smaller positive values are raised to it."""

LogitsProcessor = Callable[..., Any]
"""A callable ``(output_token_ids, logits) -> logits`` or ``(prompt_ids, output_ids, logits) -> logits``."""


class RequestOutputKind(enum.Enum):
    """How much of the generated text each ``RequestOutput`` of a request carries."""

    CUMULATIVE = 0
    """Every output holds everything generated so far."""
    DELTA = 1
    """Every output holds only what was generated since the previous one."""
    FINAL_ONLY = 2
    """Only the finished output is produced."""


class SamplingType(enum.IntEnum):
    """Which sampler a request needs."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_list(name: str, value: Any, expected: str) -> list:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return list(value)


_IMMUTABLE = frozenset({type(None), bool, int, float, str, RequestOutputKind})


@dataclass(repr=False, eq=True)
class SamplingParams:
    """Settings that control how tokens are sampled and when generation stops.

    Attributes:
        n: Number of completions to return for the prompt.
        presence_penalty: Added penalty for tokens that already appear in the output, in [-2, 2].
            Positive values push towards new tokens.
        frequency_penalty: Penalty scaled by how often a token already appears in the output,
            in [-2, 2].
        repetition_penalty: Multiplicative penalty for tokens seen in the prompt or output; 1 turns
            it off, values above 1 discourage repeats. Must be positive.
        temperature: Softmax temperature; 0 means greedy decoding.
        top_p: Keep the smallest set of tokens whose probabilities add up to at least this, in (0, 1].
        top_k: Keep only the k most likely tokens; 0 or -1 keeps all of them.
        min_p: Drop tokens whose probability is below ``min_p`` times that of the most likely
            token, in [0, 1].
        seed: Seed for this request's random sampling; ``None`` uses the engine's generator.
        stop: Strings that end generation; the matched string is left out of the text unless
            ``include_stop_str_in_output`` is set.
        stop_token_ids: Token ids that end generation. Stop tokens are kept in ``token_ids`` but
            not rendered in the text unless they are special tokens that are not skipped.
        bad_words: Words that must never be generated.
        ignore_eos: Keep generating past the end-of-sequence token.
        max_tokens: Most tokens to generate per completion; ``None`` means up to the model's
            context length.
        min_tokens: Fewest tokens to generate before EOS or a stop token may be sampled.
        logprobs: Number of top log-probabilities to return per generated token (the sampled token
            is always included); -1 means the whole vocabulary.
        prompt_logprobs: Number of log-probabilities to return per prompt token; -1 means the whole
            vocabulary.
        flat_logprobs: Return log-probabilities in a flat layout instead of a list of dicts.
        detokenize: Turn generated token ids into text.
        skip_special_tokens: Leave special tokens out of the text.
        spaces_between_special_tokens: Put spaces between adjacent special tokens in the text.
        logits_processors: Callables that edit the logits before sampling.
        include_stop_str_in_output: Keep the matched stop string in the text.
        truncate_prompt_tokens: Keep only the last k prompt tokens; -1 means the model's limit.
        output_kind: How much of the output each intermediate result carries.
        structured_outputs: Constraint on the output format (JSON schema, regex, choice, grammar).
        logit_bias: Token id to value added to its logit before sampling.
        allowed_token_ids: If set, only these tokens may be sampled.
        extra_args: Free-form arguments for custom samplers or processors.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    flat_logprobs: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Any | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None

    all_stop_token_ids: set[int] = field(default_factory=set, init=False, compare=False)
    """``stop_token_ids`` plus the model's end-of-sequence ids (see ``update_from_generation_config``)."""
    bad_words_token_ids: list[list[int]] = field(default_factory=list, init=False, compare=False)
    """Token-id sequences that are never generated, from ``bad_words`` (see ``update_from_tokenizer``)."""

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()
        if self.is_greedy:
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
        elif self.temperature < MIN_RANDOM_TEMPERATURE:
            logger.warning(
                "temperature %s is too small for stable sampling; using %s instead.",
                self.temperature,
                MIN_RANDOM_TEMPERATURE,
            )
            self.temperature = MIN_RANDOM_TEMPERATURE
        self.all_stop_token_ids = set(self.stop_token_ids)

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments where ``None`` means "use the default".

        ``None`` is kept for fields where it is a meaningful value (``max_tokens``, ``seed``, ...).
        """
        defaults = {f.name: f.default for f in fields(cls) if f.init}
        for name, value in list(kwargs.items()):
            if value is None and name in defaults and defaults[name] is not None and name != "max_tokens":
                del kwargs[name]
        return cls(**kwargs)

    def _normalise(self) -> None:
        # Ints and floats are accepted for float fields and stored as float.
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p"):
            self._coerce_float(name)
        self._coerce_float("min_p")

        if self.top_k == -1:
            self.top_k = 0
        if _is_int(self.seed) and self.seed == -1:
            self.seed = None
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is True:
                setattr(self, name, 1)
            elif value is False:
                setattr(self, name, None)

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = _as_list("stop", self.stop, "a str or a list of str")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, "a list of int")
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif self.bad_words is not None:
            self.bad_words = _as_list("bad_words", self.bad_words, "a str or a list of str")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list("allowed_token_ids", self.allowed_token_ids, "a list of int")
        if self.logits_processors is not None:
            self.logits_processors = _as_list(
                "logits_processors", self.logits_processors, "a list of callables"
            )
        if self.logit_bias is not None:
            self.logit_bias = self._parse_logit_bias(self.logit_bias)
        if self.structured_outputs is not None:
            from kiln.structured.params import StructuredOutputsParams

            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)

    def _coerce_float(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_real(value):
            raise ValueError(f"{name} must be a number, got {value!r}.")
        setattr(self, name, float(value))

    @staticmethod
    def _parse_logit_bias(bias: Any) -> dict[int, float]:
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id to bias, got {bias!r}.")
        parsed: dict[int, float] = {}
        for key, value in bias.items():
            try:
                token_id = int(key)
                parsed[token_id] = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"logit_bias must map token ids to numbers, got {key!r}: {value!r}."
                ) from None
            if not math.isfinite(parsed[token_id]):
                raise ValueError(f"logit_bias values must be finite, got {key!r}: {value!r}.")
        return parsed

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        self._check_int("n")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        if not self.repetition_penalty > 0.0 or math.isinf(self.repetition_penalty):
            raise ValueError(
                f"repetition_penalty must be positive and finite, got {self.repetition_penalty}."
            )
        if not self.temperature >= 0.0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be non-negative and finite, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        self._check_int("top_k")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (no limit) or a positive number, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed must be an int or None, got {self.seed!r}.")
            self.seed = int(self.seed)

        if self.max_tokens is not None:
            self._check_int("max_tokens")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        self._check_int("min_tokens")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}."
            )

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            self._check_int(name)
            if value < -1:
                raise ValueError(f"{name} must be non-negative or -1 (whole vocabulary), got {value}.")
        if self.truncate_prompt_tokens is not None:
            self._check_int("truncate_prompt_tokens")
            if self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1:
                raise ValueError(
                    f"truncate_prompt_tokens must be at least 1 or -1 (model limit), "
                    f"got {self.truncate_prompt_tokens}."
                )

        for stop in self.stop:
            if not isinstance(stop, str):
                raise ValueError(f"stop must hold strings, got {stop!r}.")
            if not stop:
                raise ValueError(f"stop cannot contain an empty string, got {self.stop!r}.")
        if self.stop and not self.detokenize:
            raise ValueError(f"stop strings need detokenize=True, got stop={self.stop!r}.")
        self._check_token_ids("stop_token_ids", self.stop_token_ids)
        if self.bad_words is not None:
            for word in self.bad_words:
                if not isinstance(word, str) or not word.strip():
                    raise ValueError(f"bad_words must hold non-blank strings, got {word!r}.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError(f"allowed_token_ids must not be empty, got {self.allowed_token_ids!r}.")
            self._check_token_ids("allowed_token_ids", self.allowed_token_ids)
        if self.logits_processors is not None:
            for proc in self.logits_processors:
                if not callable(proc):
                    raise ValueError(f"logits_processors must hold callables, got {proc!r}.")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}.")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise ValueError(f"extra_args must be a dict or None, got {self.extra_args!r}.")

        if self.temperature < SAMPLING_EPS and self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def _check_int(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}.")
        setattr(self, name, int(value))

    @staticmethod
    def _check_token_ids(name: str, token_ids: list[int]) -> None:
        for token_id in token_ids:
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"{name} must hold non-negative ints, got {token_id!r}.")

    # ------------------------------------------------------------------ derived properties

    @property
    def is_greedy(self) -> bool:
        """True when the request decodes by argmax."""
        return self.temperature < SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        """The sampler this request needs."""
        if self.is_greedy:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def output_text_buffer_length(self) -> int:
        """Characters to hold back from streamed text so that a partial stop string is never shown."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    # ------------------------------------------------------------------ engine hooks

    def update_from_generation_config(
        self, generation_config: dict[str, Any] | None, eos_token_id: int | None = None
    ) -> None:
        """Add the model's end-of-sequence ids to the stop sets.

        ``eos_token_id`` (the tokenizer's EOS) always joins ``all_stop_token_ids``; the engine
        checks it on its own, honouring ``ignore_eos``. Extra EOS ids listed under
        ``generation_config["eos_token_id"]`` (an int or a list) join ``all_stop_token_ids`` and,
        unless ``ignore_eos`` is set, ``stop_token_ids`` as well, so that they end generation and
        show up as ``stop_reason``.
        """
        if eos_token_id is not None:
            self.all_stop_token_ids.add(int(eos_token_id))
        config_eos = (generation_config or {}).get("eos_token_id")
        if config_eos is None:
            return
        extra = {int(config_eos)} if _is_int(config_eos) else {int(t) for t in config_eos}
        extra.discard(eos_token_id)
        if not extra:
            return
        self.all_stop_token_ids.update(extra)
        if not self.ignore_eos:
            known = set(self.stop_token_ids)
            self.stop_token_ids.extend(sorted(extra - known))

    def update_from_tokenizer(self, tokenizer) -> None:
        """Encode ``bad_words`` (vLLM's rule): each word as it stands and, when that gives a new first
        token and as many tokens, after a space, so it is banned at the start and in the middle of text."""
        self.bad_words_token_ids = []
        for word in self.bad_words or ():
            for prefix in ("", " "):
                ids = tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                if not ids:
                    continue
                if prefix:
                    last = self.bad_words_token_ids[-1] if self.bad_words_token_ids else None
                    if last is None or ids[0] == last[0] or len(ids) != len(last):
                        continue
                self.bad_words_token_ids.append(ids)

    def clone(self) -> SamplingParams:
        """Deep copy; logits processors are shared, not copied, since they may hold large state.
        Attributes holding immutable values are taken as they are (``copy.deepcopy`` of the whole
        object walks every one: a few times slower, once per request)."""
        memo: dict[int, Any] = {}
        for proc in self.logits_processors or ():
            memo[id(proc)] = proc
        new = object.__new__(type(self))
        state = new.__dict__
        for name, value in self.__dict__.items():
            state[name] = value if type(value) in _IMMUTABLE else copy.deepcopy(value, memo)
        return new

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            text = f"{type(value).__name__}.{value.name}" if isinstance(value, enum.Enum) else repr(value)
            parts.append(f"{f.name}={text}")
        return f"SamplingParams({', '.join(parts)})"


def _init_with_removed_fields(init):
    """``best_of`` left vLLM's SamplingParams; say so instead of Python's bare unexpected-argument error."""
    import functools

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "best_of" in kwargs:
            raise TypeError(
                "SamplingParams: 'best_of' was removed from vLLM's SamplingParams and kiln follows it; "
                "use n to get several completions (and pick among them by cumulative_logprob)"
            )
        init(self, *args, **kwargs)

    return __init__


SamplingParams.__init__ = _init_with_removed_fields(SamplingParams.__init__)
