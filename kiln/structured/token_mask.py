"""The grammar's verdict for one step: an int32 bitmask (one row per constrained logits row, bit
``t % 32`` of word ``t // 32`` = token ``t`` allowed), filled on the host, copied without blocking and
applied on the device. Rows without a constraint are not in it and are left untouched. A bitmask may
be narrower than the vocabulary (the grammar's vocabulary ends at the tokenizer's last id, the model's
may be padded past it): the tokens past its last word are never allowed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.runtime.transfer import to_device

_NEG_INF = float("-inf")


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


_BITS: dict[torch.device, torch.Tensor] = {}


def _bits(device: torch.device) -> torch.Tensor:
    """int32 [32]: word value of each bit (bit 31 is the sign bit)."""
    if device not in _BITS:  # built on the device: a host copy would wait for the device's queue
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        _BITS[device] = torch.ones(32, dtype=torch.int32, device=device).bitwise_left_shift_(shifts)
    return _BITS[device]


def banned_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[rows, words]`` int32 -> ``[rows, vocab_size]`` bool, True where the token is not allowed
    (every token past the last word too)."""
    banned = (bitmask.unsqueeze(-1) & _bits(bitmask.device)).eq_(0).flatten(1)[:, :vocab_size].bool()
    if banned.shape[1] < vocab_size:
        banned = torch.nn.functional.pad(banned, (0, vocab_size - banned.shape[1]), value=True)
    return banned


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[rows, words]`` int32 -> ``[rows, vocab_size]`` bool, True where the token is allowed."""
    return ~banned_tokens(bitmask, vocab_size)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    """``logits`` with disallowed tokens at -inf in ``rows`` (all rows, in order, when None)."""
    banned = banned_tokens(bitmask, logits.shape[1])
    if rows is None:
        return logits.masked_fill(banned, _NEG_INF)
    masked = logits.index_select(0, rows).masked_fill_(banned, _NEG_INF)
    return logits.index_copy(0, rows, masked)


def ban_unless_nothing_left(row: torch.Tensor, token_ids, vocab_size: int) -> None:
    """Clear ``token_ids`` in one host bitmask row, unless that leaves no token allowed (min_tokens
    yields to the grammar once only a stop token can end the structure)."""
    words = row.numpy().view(np.uint32)
    kept = words.copy()
    for t in token_ids:
        if 0 <= t < vocab_size and t >> 5 < len(words):
            words[t >> 5] &= np.uint32(0xFFFFFFFF ^ (1 << (t & 31)))
    if not words.any():
        words[:] = kept


@dataclass
class GrammarBitmask:
    """What the engine hands the worker for a deferred sampling: plain host data."""

    rows: list[int]  # sampling rows of the step that are constrained
    bitmask: torch.Tensor  # int32 [len(rows), words <= bitmask_words(vocab)] on the host (pinned on CUDA)
    num_rows: int  # sampling rows of the step

    def to_device(self, device: torch.device) -> TokenMask:
        """A non-blocking copy (from pinned memory) queued behind the device's work."""
        rows = None if len(self.rows) == self.num_rows else self.rows
        return TokenMask(self.bitmask.to(device, non_blocking=True), rows)


_IDENTITY: dict[tuple[torch.device, int], torch.Tensor] = {}


@dataclass
class TokenMask:
    """The step's grammar mask on the logits' device. The sampler applies it to the logits
    (``apply``) or, where nothing but the token choice reads them, inside its sampling kernel
    (``kiln.ops.sample_argmax``, through ``row_map``)."""

    bitmask: torch.Tensor  # int32 [len(rows), words] on the logits' device
    rows: list[int] | None  # the logits rows the bitmask's rows are for, in order; None = every row

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = None if self.rows is None else to_device(self.rows, logits.device, torch.long)
        return apply_token_bitmask(logits, self.bitmask, rows)

    def row_map(self, num_rows: int) -> torch.Tensor:
        """int32 ``[num_rows]`` on the bitmask's device: each logits row's bitmask row, -1 for a row
        without a constraint."""
        device = self.bitmask.device
        if self.rows is None:
            key = (device, num_rows)
            if key not in _IDENTITY:  # every row constrained, the common case: made once, no copy a step
                _IDENTITY[key] = torch.arange(num_rows, dtype=torch.int32, device=device)
            return _IDENTITY[key]
        index = [-1] * num_rows
        for j, row in enumerate(self.rows):
            index[row] = j
        return to_device(index, device, torch.int32)
