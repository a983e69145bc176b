"""Per-sequence pooling state and the runner's step hook that fills it.

A pooling request is a prompt-only sequence: the scheduler prefills it (in chunks across steps when
the token budget says so) and the runner keeps, on the device, only what its pooling needs from each
step's hidden states: the last row (LAST), a float32 running sum (MEAN), the first row (CLS) or
every row (ALL). A chunk starting at position 0 restarts the state, so a preempted sequence that is
recomputed pools its prompt once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.runtime.transfer import to_device


@dataclass(eq=False)
class PoolingState:
    """What one request asks for (task, pooling, dimensions, activation) and its pooled rows."""

    task: str
    pooling: str  # "LAST", "MEAN", "CLS" or "ALL"
    dimensions: int | None
    use_activation: bool
    partial: torch.Tensor | None = None  # MEAN: running sum; CLS: the first row
    rows: list[torch.Tensor] = field(default_factory=list)  # ALL: every chunk's rows
    pooled: torch.Tensor | None = None  # set when the last prompt chunk has run

    @property
    def reads_prefix_cache(self) -> bool:
        """Only LAST pooling can skip computing a cached prefix: the others read every position."""
        return self.pooling == "LAST"


def collect_pooled(hidden: torch.Tensor, seqs, num_new_tokens: list[int], starts: list[int]) -> None:
    """Keep the hidden rows the batch's pooling sequences need (copies: ``hidden`` may be a graph's
    static buffer). Called before ``num_computed_tokens`` advances past this step's chunk."""
    last_rows, last_states = [], []
    for seq, n, row0 in zip(seqs, num_new_tokens, starts):
        state = seq.pooling
        if state is None:
            continue
        lo = seq.num_computed_tokens
        done = lo + n == seq.num_prompt_tokens
        if state.pooling == "LAST":
            if done:
                last_rows.append(row0 + n - 1)
                last_states.append(state)
        elif state.pooling == "MEAN":
            part = hidden[row0 : row0 + n].float().sum(0)
            state.partial = part if lo == 0 else state.partial + part
            if done:
                state.pooled = state.partial / seq.num_prompt_tokens
        elif state.pooling == "CLS":
            if lo == 0:
                state.partial = hidden[row0].clone()
            if done:
                state.pooled = state.partial
        else:  # ALL
            if lo == 0:
                state.rows = []
            state.rows.append(hidden[row0 : row0 + n].clone())
            if done:
                state.pooled = torch.cat(state.rows)
                state.rows = []
    if last_rows:
        picked = hidden.index_select(0, to_device(last_rows, hidden.device, torch.long))
        for i, state in enumerate(last_states):
            state.pooled = picked[i]
