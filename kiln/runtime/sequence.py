"""One generated sequence (a request with ``n`` samples has ``n`` of them) and its running state.

Two parts of the engine write a ``Sequence``: the scheduler (with its KV-cache manager: status,
computed tokens, blocks, pending tokens) and the output processor (accepted tokens, text, logprobs,
finish). The worker never sees one; it gets plain data (``kiln.runtime.step_data``).
"""

import enum
from array import array
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.outputs import Logprob
from kiln.runtime.sampling_params import SamplingParams


def block_table(ids=()) -> array:
    """A sequence's block ids as an int32 ``array``: the runner copies each row of a step's block table
    into the step's buffer with one memory copy, where a list is converted id by id every step."""
    return array("i", ids)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # a beam that sampled: keeps its blocks, not scheduled until its next token is chosen
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # sample index within its request
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # max_tokens capped so that prompt + output fits max_model_len
    cache_salt: str | None = None  # enters the first block's hash: different salts share no cached blocks
    priority: int = 0  # with scheduling_policy="priority": lower values are scheduled first
    output_token_ids: list[int] = field(default_factory=list)  # tokens read back from the device
    num_pending_tokens: int = 0  # sampled by a launched step, not read back yet (at most one)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    block_ids: array = field(default_factory=block_table)  # int32 block ids (see block_table)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of this sequence's full blocks
    num_published_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_cached_tokens: int | None = None  # prefix-cache hit at first schedule
    num_preemptions: int = 0
    awaiting_finish: bool = False  # launched tokens reach max_tokens / max_model_len; finishes on read-back
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    lora: Any = None  # kiln.lora.adapter.LoRAAdapter this sequence runs with (None: the base model)
    lora_request: Any = None  # the kiln.lora.request.LoRARequest it was added with, for its outputs
    pooling: Any = None  # kiln.pooling.state.PoolingState of a prompt-only pooling request
    grammar: object = None  # kiln.structured.grammar_state.GrammarState of a constrained sequence
    beam: bool = False  # a beam search's beam: held after each sampled token (Status.HELD)
    # a beam's last sampled distribution, (TopLogprobs, row) (kiln/runtime/top_logprobs.py); a beam
    # gets no Logprob dicts nor cumulative logprob: its search keeps those
    beam_candidates: Any = None

    def __post_init__(self):
        if self.params.logprobs is not None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, pending ones included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, lo: int, hi: int) -> list[int]:
        """``token_ids[lo:hi]`` without building the whole list."""
        n = len(self.prompt_token_ids)
        if hi <= n:
            return self.prompt_token_ids[lo:hi]
        if lo >= n:
            return self.output_token_ids[lo - n : hi - n]
        return self.prompt_token_ids[lo:] + self.output_token_ids[: hi - n]

    def fork(self, seq_id: int) -> "Sequence":
        """A copy of this sequence's tokens and output state under a new id (index: the id, unique in
        its request). The copy holds no KV blocks: ``KVCacheManager.fork`` shares them."""
        child = Sequence(
            seq_id,
            self.request_id,
            seq_id,
            self.prompt_token_ids,  # never changed: shared
            self.params,
            self.max_tokens,
            cache_salt=self.cache_salt,
            priority=self.priority,
        )
        child.output_token_ids = list(self.output_token_ids)
        child.block_hashes = list(self.block_hashes)  # the same tokens: the same chain
        child.num_cached_tokens = self.num_cached_tokens
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.cumulative_logprob = self.cumulative_logprob
        child.first_scheduled_time, child.first_token_time = self.first_scheduled_time, self.first_token_time
        child.prompt_logprobs = self.prompt_logprobs
        child.lora, child.lora_request, child.beam = self.lora, self.lora_request, self.beam
        return child

    def check_last_token_uncomputed(self) -> None:
        """Its last token is an output token, read back and not in the KV cache yet: it may change."""
        if (
            self.num_pending_tokens
            or self.num_computed_tokens >= self.num_known_tokens
            or not self.output_token_ids
        ):
            raise RuntimeError(f"sequence {self.seq_id}: its last token is not an uncomputed output token")

    def choose_last_token(self, token: int) -> None:
        """Replace the last output token, read back but not computed yet, by ``token`` from the same
        distribution (a beam search's choice); the cumulative logprob follows."""
        self.check_last_token_uncomputed()
        old, self.output_token_ids[-1] = self.output_token_ids[-1], token
        if self.logprobs:
            dist = self.logprobs[-1]
            self.cumulative_logprob += dist[token].logprob - dist[old].logprob

    @property
    def lora_id(self) -> int:
        """The adapter's ``lora_int_id``; 0 for the base model."""
        return self.lora.id if self.lora is not None else 0

    @property
    def grammar_pending(self) -> bool:
        """Its grammar is still compiling: the scheduler leaves it waiting."""
        return self.grammar is not None and not self.grammar.ready

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def reads_prefix_cache(self) -> bool:
        """Prompt logprobs and most poolings need every prompt position computed."""
        if self.pooling is not None:
            return self.pooling.reads_prefix_cache
        return not self.wants_prompt_logprobs

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Still owes prompt logprobs (they need every prompt position computed, so no prefix-cache reuse)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens
