"""What the engine and the worker exchange each step: plain data, no ``Sequence`` objects.

``SchedulerOutput`` goes in (built by the scheduler): the sequences new to the worker, those that
finished since the last step, the KV blocks to copy before the forward (a forked beam's last,
partial block), and per scheduled sequence the tokens to compute, where they start, its
block table and how to sample it. ``RunnerOutput`` comes out: one sampled token per sampling row,
held on the device until ``read_back()`` (``token_ids`` is ``None`` until then), plus the logprobs
asked for.

Overlap: a step may be launched before the previous one is read back. A sequence whose last input
token is the previous step's sampled token (not known on the host yet) is flagged
``last_token_pending``; the worker takes that token from the previous step's device output.
"""

from array import array
from dataclasses import dataclass, field

import torch

from kiln.runtime.sampling_params import SamplingParams


@dataclass
class NewSequence:
    """A sequence the worker has not seen: its sampling state is set up once."""

    seq_id: int
    seed: int | None  # a seeded request's per-sample seed (its own generator), None for the shared one


@dataclass(slots=True)
class ScheduledSequence:
    seq_id: int
    token_ids: list[int]  # this step's input tokens known on the host (all but a pending last one)
    start: int  # position of the first of them (tokens already in the KV cache)
    num_tokens: int  # tokens computed this step (len(token_ids) + last_token_pending)
    last_token_pending: bool  # the last input token is the previous step's sampled token
    block_ids: array  # the sequence's block table (int32 ids; a list works too)
    sample: bool  # this step reaches the end of the sequence: sample its next token
    params: SamplingParams
    num_output_tokens: int  # output tokens before this step's sample, pending ones included
    prompt_token_ids: list[int]  # read-only views, for penalties and prompt logprobs
    output_token_ids: list[int]  # tokens read back so far (complete when the step needs host tokens)
    prompt_logprobs: int | None = None  # top-k of prompt logprobs owed for this step's prompt positions
    prompt_logprobs_done: int = 0  # prompt positions whose logprobs are already known (a recomputed prefix)
    generator: torch.Generator | None = None  # set by the worker: the sequence's seeded generator
    lora_slot: int = -1  # device slot of the sequence's LoRA adapter, -1 for the base model
    pooling: str | None = None  # a pooling request's pooling ("LAST", "MEAN", "CLS", "ALL"); never samples


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # finished or aborted since the last step
    # (src, dst) block ids: every layer's KV of block src copied to block dst before the forward
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)
    # constrained rows: the worker launches forward and logits only; Worker.sample_deferred samples
    # once the engine has read the previous step back and filled the grammar's mask
    defer_sampling: bool = False

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


# (top token ids, their logprobs, sampled token logprob, sampled token rank), see sampler.top_logprobs
LogprobEntry = tuple[list[int], list[float], float, int]


@dataclass
class RunnerOutput:
    """A launched step. Its sampled tokens stay on the device until ``read_back()`` (one wait, for
    this step only: a pinned host copy is queued behind the step's kernels and an event marks it)."""

    seq_ids: list[int]  # sequences that sampled a token, in row order
    tokens: torch.Tensor | None  # int64 [rows] on the device
    logprobs: list[LogprobEntry | None]  # per row, when asked for
    prompt_logprobs: dict[int, list[tuple[int, LogprobEntry]]]  # seq id -> (target token, entry) per position
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)  # seq id -> pooled rows, on the device
    token_ids: list[int] | None = None  # None: not yet read back
    host_tokens: torch.Tensor | None = None
    ready: "torch.cuda.Event | None" = None

    def __post_init__(self):
        if not self.seq_ids:
            self.token_ids = []

    @property
    def is_read_back(self) -> bool:
        return self.token_ids is not None

    def copy_out(self) -> None:
        """Start copying ``tokens`` to pinned host memory behind the step's own kernels."""
        if self.tokens is not None and self.tokens.is_cuda:
            self.host_tokens = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host_tokens.copy_(self.tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def read_back(self) -> list[int]:
        """The sampled token ids (waits for this step's copy the first time)."""
        if self.token_ids is None:
            if self.ready is None:
                self.token_ids = self.tokens.tolist()
            else:
                self.ready.synchronize()
                self.token_ids = self.host_tokens.tolist()
        return self.token_ids
