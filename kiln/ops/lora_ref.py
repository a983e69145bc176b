"""Torch references of the batched LoRA products (CPU path and the Triton kernels' oracle).

Layouts: ``a`` ``[slots, shards, R, K]``, ``b`` ``[slots, N, R]`` (scale folded in, shard ``s`` owning
output columns ``slice_sizes[:s].sum() ...``), ``h`` ``[T, shards, R]`` in float32. ``token_slots[t]``
is token ``t``'s adapter slot, -1 for the base model (such rows get no delta and their ``h`` is
unspecified). ``h`` is rounded to the weights' dtype before the expand, as peft rounds ``lora_A``'s
output to the model dtype.
"""

import torch


def _groups(token_slots: torch.Tensor, num_tokens: int):
    slots = token_slots[:num_tokens]
    for slot in slots.unique().tolist():
        if slot >= 0:
            yield slot, (slots == slot).nonzero().squeeze(1)


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``h[t, s] = x[t] @ a[slot(t), s].T`` for every token with an adapter."""
    num_tokens, (_, shards, rank, k) = x.shape[0], a.shape
    h = torch.zeros(num_tokens, shards, rank, dtype=torch.float32, device=x.device)
    for slot, rows in _groups(token_slots, num_tokens):
        h[rows] = (x[rows].float() @ a[slot].reshape(shards * rank, k).float().T).view(-1, shards, rank)
    return h


def lora_expand_ref_(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, slice_sizes: list[int]
) -> None:
    """``y[t, cols of shard s] += h[t, s] @ b[slot(t), cols].T`` in place."""
    for slot, rows in _groups(token_slots, y.shape[0]):
        parts, lo = [], 0
        for s, size in enumerate(slice_sizes):
            parts.append(h[rows, s].to(b.dtype).float() @ b[slot, lo : lo + size].float().T)
            lo += size
        y[rows] = (y[rows].float() + torch.cat(parts, dim=1)).to(y.dtype)


def lora_add_ref_(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slots: torch.Tensor,
    slice_sizes: list[int],
) -> None:
    """``y[t] += x[t] @ a[slot(t)].T @ b[slot(t)].T`` (per shard) in place: the shrink, then the expand."""
    lora_expand_ref_(y, lora_shrink_ref(x, a, token_slots), b, token_slots, slice_sizes)


def lora_expand_stacked_ref_(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, slice_sizes: list[int]
) -> None:
    """``lora_expand_ref_`` with ``h`` ``[T, slots * shards * R]``: every slot's shrink side by side, as
    a base product over ``[W; a.view(slots * shards * R, K)]`` leaves it; each token reads its slot's."""
    shards, rank = len(slice_sizes), b.shape[2]
    per_slot = h.view(h.shape[0], -1, shards, rank)
    slots = token_slots[: y.shape[0]].long().clamp(min=0)
    mine = per_slot[torch.arange(y.shape[0], device=h.device), slots]  # [T, shards, R]
    lora_expand_ref_(y, mine.float(), b, token_slots, slice_sizes)
