"""Per-token adapter slots of a step, in fixed device buffers read by the LoRA ops.

``token_slots[t]``: token ``t``'s slot, -1 for base-model tokens and for every position past the
step's tokens (so padding rows of a CUDA-graph bucket get no delta). ``sorted_tokens`` and
``slot_starts`` list the same tokens grouped by slot, for the segment-grouped kernels. The buffers
never move: compiled graphs and CUDA graphs read whatever the current step wrote into them.
"""

import torch

from kiln.runtime.transfer import sections_to_device


class LoRABatch:
    def __init__(self, max_tokens: int, max_loras: int, device: torch.device):
        self.max_tokens, self.device = max_tokens, device
        ints = dict(dtype=torch.int32, device=device)
        self.token_slots = torch.full((max_tokens,), -1, **ints)
        self.sorted_tokens = torch.zeros(max_tokens, **ints)
        self.slot_starts = torch.zeros(max_loras + 1, **ints)
        self._all_base = True  # buffers currently say "no token has an adapter"

    def set(self, segments: list[tuple[int, int]]) -> None:
        """The step's tokens as consecutive ``(slot, num_tokens)`` runs, in batch order."""
        num_tokens = sum(n for _, n in segments)
        if num_tokens > self.max_tokens:
            raise ValueError(f"LoRA batch of {num_tokens} tokens exceeds its buffers ({self.max_tokens})")
        if all(slot < 0 for slot, _ in segments):
            if not self._all_base:
                self.token_slots.fill_(-1)
                self.slot_starts.zero_()
                self._all_base = True
            return
        slots, by_slot, start = [], {}, 0
        for slot, n in segments:
            slots.extend([slot] * n)
            if slot >= 0:
                by_slot.setdefault(slot, []).extend(range(start, start + n))
            start += n
        num_slots = self.slot_starts.shape[0] - 1
        order, starts = [], [0]
        for slot in range(num_slots):
            order.extend(by_slot.get(slot, ()))
            starts.append(len(order))
        slots_t, order_t, starts_t = sections_to_device([slots, order, starts], self.device, torch.int32)
        self.token_slots[:num_tokens].copy_(slots_t)
        self.token_slots[num_tokens:].fill_(-1)
        self.sorted_tokens[: len(order)].copy_(order_t)
        self.slot_starts.copy_(starts_t)
        self._all_base = False
