"""The logprobs rows asked for, computed on the device for every row at once and brought to the host in
one copy (``TopLogprobs``): per row the top ``k`` token ids and logprobs, the logprob and rank of the
row's token. Entries are read row by row (the output processor's ``Logprob`` dicts) or as arrays (a
beam search's candidates, ``kiln/runtime/beam_search.py``).
"""

from __future__ import annotations

import torch


class TopLogprobs:
    """Per row: ``(top ids, their logprobs, logprob of the row's token, its rank)``, or None for a row
    that asked for none (``LogprobEntry``, ``kiln/runtime/step_data.py``). On CUDA the host copy is
    queued behind the kernels that compute it; the first read waits for it.

    Arrays (numpy, after ``wait``): ``ids`` and ``values`` ``[n, widest]``, ``token_ids`` (the rows'
    tokens), ``token_values`` and ``ranks`` ``[n]`` for the ``n`` rows that asked, in row order;
    ``index[row]`` is a row's line in them (-1 without logprobs), ``ks[line]`` how many of its top
    entries it asked for."""

    def __init__(
        self, num_rows: int, rows: list[int], ks: list[int], ints: torch.Tensor, floats: torch.Tensor
    ):
        self.num_rows, self.ks, self.widest = num_rows, ks, ints.shape[1] - 2
        self.index = [-1] * num_rows
        for line, row in enumerate(rows):
            self.index[row] = line
        self._ints, self._floats, self._ready = ints, floats, None
        if ints.is_cuda:
            self._ints = torch.empty(ints.shape, dtype=ints.dtype, pin_memory=True)
            self._floats = torch.empty(floats.shape, dtype=floats.dtype, pin_memory=True)
            self._ints.copy_(ints, non_blocking=True)
            self._floats.copy_(floats, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._lists = None
        self.ids = self.values = self.token_ids = self.token_values = self.ranks = None

    def wait(self) -> None:
        """Wait for the host copy (once); the arrays are readable after it."""
        pinned = self._ready is not None
        if pinned:
            self._ready.synchronize()
            self._ready = None
        if self.ids is None:
            ints, floats = self._ints.numpy(), self._floats.numpy()
            if pinned:  # the pinned buffers go back to the allocator's cache (a search keeps every step's)
                ints, floats = ints.copy(), floats.copy()
            self._ints = self._floats = None
            w = self.widest
            self.ids, self.token_ids, self.ranks = ints[:, :w], ints[:, w], ints[:, w + 1]
            self.values, self.token_values = floats[:, :w], floats[:, w]

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int):
        line = self.index[row]
        if line < 0:
            return None
        if self._lists is None:
            self.wait()
            self._lists = (
                self.ids.tolist(),
                self.values.tolist(),
                self.token_values.tolist(),
                self.ranks.tolist(),
            )
        ids, values, token_values, ranks = self._lists
        k = self.ks[line]
        return (ids[line][:k], values[line][:k], token_values[line], ranks[line])

    def __iter__(self):
        return (self[row] for row in range(self.num_rows))


def top_logprobs(logprobs: torch.Tensor, token_ids, ks: list[int | None]):
    """``TopLogprobs`` of ``logprobs`` ``[rows, vocab]`` for the rows whose ``k`` is set (``-1``: the whole
    vocabulary); ``token_ids`` (a list, or an int64 tensor on the device: no host sync) holds each row's
    token. A list of Nones when no row asks."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    if not rows:
        return [None] * len(ks)
    vocab, device = logprobs.shape[1], logprobs.device
    row_ks = [vocab if ks[i] == -1 else ks[i] for i in rows]
    widest = max(row_ks)
    if not torch.is_tensor(token_ids):
        token_ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    token_ids = token_ids.long()
    if len(rows) < len(ks):
        idx = torch.tensor(rows, device=device)
        sub, chosen = logprobs[idx], token_ids[idx]
    else:
        sub, chosen = logprobs, token_ids
    chosen_lp = sub.gather(1, chosen[:, None])
    ranks = (sub > chosen_lp).sum(-1, keepdim=True) + 1
    top_lp, top_ids = sub.topk(widest, dim=-1) if widest > 0 else (sub[:, :0], sub[:, :0].long())
    ints = torch.cat([top_ids, chosen[:, None], ranks], 1)
    floats = torch.cat([top_lp, chosen_lp], 1).float()
    return TopLogprobs(len(ks), rows, row_ks, ints, floats)
