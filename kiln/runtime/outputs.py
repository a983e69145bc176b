"""Results handed back by ``LLM.generate``: ``RequestOutput`` holding one ``CompletionOutput`` per sample.

Log-probabilities use two shapes:

* ``SampleLogprobs`` (``CompletionOutput.logprobs``): one dict per generated token, mapping token id to
  ``Logprob``; each dict holds the sampled token plus the requested top-k tokens.
* ``PromptLogprobs`` (``RequestOutput.prompt_logprobs``): one entry per prompt token; the first is
  ``None`` since nothing precedes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """Log-probability of one token at one position.

    Attributes:
        logprob: Natural-log probability of the token.
        rank: 1-based rank of the token in the vocabulary at that position (1 = most likely).
        decoded_token: The token's text, when detokenization is on.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(repr=False)
class CompletionOutput:
    """One generated sequence of a request.

    Attributes:
        index: Position of this sample among the request's ``n`` samples.
        text: Generated text.
        token_ids: Generated token ids.
        cumulative_logprob: Sum of the sampled tokens' log-probabilities, or ``None`` when not tracked.
        logprobs: Per-token log-probabilities when requested (see ``SampleLogprobs``).
        finish_reason: ``"stop"`` (EOS, stop string or stop token), ``"length"`` (hit ``max_tokens`` or
            the context limit), ``"abort"``, or ``None`` while still running.
        stop_reason: The stop string or stop token id that ended the sequence; ``None`` for EOS, for
            length limits and while running.
        lora_request: The LoRA adapter used, if any.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any | None = None

    def finished(self) -> bool:
        """Whether this sequence has stopped generating."""
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids!r}, "
            f"cumulative_logprob={self.cumulative_logprob!r}, logprobs={self.logprobs!r}, "
            f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})"
        )


@dataclass
class RequestMetrics:
    """Timestamps (seconds, ``time.time()`` clock) and counters of one request.

    Attributes:
        arrival_time: When the request was received.
        first_scheduled_time: When it was first given a slot in a batch.
        first_token_time: When its first output token was produced.
        last_token_time: When its latest output token was produced.
        finished_time: When it finished.
        time_in_queue: Seconds between arrival and first scheduling.
        num_generation_tokens: Output tokens produced so far, summed over samples.
    """

    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None
    num_generation_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first output token, if both are known."""
        if self.arrival_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        """Seconds from arrival to finish, if both are known."""
        if self.arrival_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass(repr=False)
class RequestOutput:
    """Everything produced for one prompt.

    Attributes:
        request_id: Unique id of the request.
        prompt: Prompt text, or ``None`` when the prompt was given as token ids only.
        prompt_token_ids: Prompt token ids.
        prompt_logprobs: Per-prompt-token log-probabilities when requested (see ``PromptLogprobs``).
        outputs: One ``CompletionOutput`` per sample.
        finished: Whether every sample has finished.
        metrics: Timing information.
        lora_request: The LoRA adapter used, if any.
        encoder_prompt: Encoder prompt text for encoder-decoder models.
        encoder_prompt_token_ids: Encoder prompt token ids for encoder-decoder models.
        num_cached_tokens: Prompt tokens served from the prefix cache.
        kv_transfer_params: Parameters for handing the KV cache to another instance.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    lora_request: Any | None = None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    num_cached_tokens: int | None = None
    kv_transfer_params: dict[str, Any] | None = field(default=None, kw_only=True)

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Merge a later output of the same request into this one.

        With ``aggregate`` the new text, token ids and logprobs of each sample are appended (for
        delta outputs); without it each sample is replaced by its newer version.
        """
        self.finished |= next_output.finished
        self.kv_transfer_params = next_output.kv_transfer_params
        if next_output.metrics is not None:
            self.metrics = next_output.metrics
        if next_output.num_cached_tokens is not None:
            self.num_cached_tokens = next_output.num_cached_tokens
        by_index = {c.index: i for i, c in enumerate(self.outputs)}
        for new in next_output.outputs:
            pos = by_index.get(new.index)
            if pos is None:
                by_index[new.index] = len(self.outputs)
                self.outputs.append(new)
                continue
            if not aggregate:
                self.outputs[pos] = new
                continue
            old = self.outputs[pos]
            old.text += new.text
            old.token_ids = list(old.token_ids) + list(new.token_ids)
            if new.logprobs is not None:
                old.logprobs = (old.logprobs or []) + list(new.logprobs)
            old.cumulative_logprob = new.cumulative_logprob
            old.finish_reason = new.finish_reason
            old.stop_reason = new.stop_reason

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids!r}, encoder_prompt={self.encoder_prompt!r}, "
            f"encoder_prompt_token_ids={self.encoder_prompt_token_ids!r}, "
            f"prompt_logprobs={self.prompt_logprobs!r}, outputs={self.outputs!r}, "
            f"finished={self.finished}, metrics={self.metrics!r}, lora_request={self.lora_request!r}, "
            f"num_cached_tokens={self.num_cached_tokens!r})"
        )
