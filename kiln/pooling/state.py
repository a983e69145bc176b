"""Pooling state on both sides of the engine/worker boundary.

A pooling request is a prompt-only sequence: the scheduler prefills it (in chunks across steps when
the token budget says so) and hands the worker its pooling type in the plain-data
``ScheduledSequence.pooling``. The runner's ``PooledRows`` keeps, on the device, only what that pooling
needs from each step's hidden states: the last row (LAST), a float32 running sum (MEAN), the first row
(CLS) or every row (ALL), and returns the pooled rows of the sequences whose last chunk ran in
``RunnerOutput.pooled``. A chunk starting at position 0 restarts the state, so a preempted sequence
that is recomputed pools its prompt once. ``PoolingState`` is the engine side: what the request asked
for (task, dimensions, activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.runtime.transfer import to_device


@dataclass(eq=False)
class PoolingState:
    """What one pooling request asks for; carried by its ``Sequence``."""

    task: str
    pooling: str  # "LAST", "MEAN", "CLS" or "ALL"
    dimensions: int | None
    use_activation: bool

    @property
    def reads_prefix_cache(self) -> bool:
        """Only LAST pooling can skip computing a cached prefix: the others read every position."""
        return self.pooling == "LAST"


class PooledRows:
    """The runner's partial pools by sequence id (device tensors)."""

    def __init__(self):
        self.partial: dict[int, torch.Tensor | list[torch.Tensor]] = {}

    def forget(self, seq_id: int) -> None:
        self.partial.pop(seq_id, None)

    def collect(self, hidden: torch.Tensor, scheduled, starts: list[int]) -> dict[int, torch.Tensor]:
        """Keep the rows this step's pooling sequences need (copies: ``hidden`` may be a graph's
        static buffer); return ``{seq id: pooled rows}`` for those whose prompt is now complete."""
        done: dict[int, torch.Tensor] = {}
        last_rows, last_ids = [], []
        for s, row0 in zip(scheduled, starts):
            kind = s.pooling
            if kind is None:
                continue
            lo, n = s.start, s.num_tokens
            complete = lo + n == len(s.prompt_token_ids)
            if kind == "LAST":
                if complete:
                    last_rows.append(row0 + n - 1)
                    last_ids.append(s.seq_id)
                continue
            if kind == "MEAN":
                part = hidden[row0 : row0 + n].float().sum(0)
                part = part if lo == 0 else self.partial[s.seq_id] + part
                result = part / len(s.prompt_token_ids) if complete else None
            elif kind == "CLS":
                part = hidden[row0].clone() if lo == 0 else self.partial[s.seq_id]
                result = part if complete else None
            else:  # ALL
                part = ([] if lo == 0 else self.partial[s.seq_id]) + [hidden[row0 : row0 + n].clone()]
                result = torch.cat(part) if complete else None
            if complete:
                self.partial.pop(s.seq_id, None)
                done[s.seq_id] = result
            else:
                self.partial[s.seq_id] = part
        if last_rows:
            picked = hidden.index_select(0, to_device(last_rows, hidden.device, torch.long))
            for i, seq_id in enumerate(last_ids):
                done[seq_id] = picked[i]
        return done
