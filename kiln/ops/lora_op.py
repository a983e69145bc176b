"""``kiln::lora_shrink`` and ``kiln::lora_expand``: the batched LoRA products as custom ops.

``lora_shrink(x, a, token_slots, sorted_tokens, slot_starts) -> h`` and
``lora_expand(y, h, b, token_slots, sorted_tokens, slot_starts, slice_sizes)`` (adds the delta to
``y`` in place) take the slot tables and the per-token slot buffers as tensors: they live at fixed
addresses, so a compiled graph or a CUDA graph sees new adapters and new batches without being
rebuilt. Registered through ``torch.library`` with fake implementations, so Dynamo traces around them
and Inductor compiles (and fuses) everything else. CUDA runs the Triton kernels
(``kiln/ops/triton_lora.py``: gathered per row up to ``ROWS_MAX_TOKENS`` tokens, segment-grouped above),
anything else the torch references (``kiln/ops/lora_ref.py``).
"""

import torch

from kiln.ops.lora_ref import lora_expand_ref_, lora_shrink_ref

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "lora_shrink(Tensor x, Tensor a, Tensor token_slots, Tensor sorted_tokens, Tensor slot_starts) -> Tensor"
)
_lib.define(
    "lora_expand(Tensor(a!) y, Tensor h, Tensor b, Tensor token_slots, Tensor sorted_tokens, "
    "Tensor slot_starts, int[] slice_sizes) -> ()"
)


def _grouped(num_tokens: int) -> bool:
    from kiln.ops.triton_lora import ROWS_MAX_TOKENS

    return num_tokens > ROWS_MAX_TOKENS


def _lora_shrink(x, a, token_slots, sorted_tokens, slot_starts):
    if not x.is_cuda:
        return lora_shrink_ref(x, a, token_slots)
    from kiln.ops.triton_lora import lora_shrink_triton

    x = x.contiguous()
    h = torch.empty(x.shape[0], a.shape[1], a.shape[2], dtype=torch.float32, device=x.device)
    lora_shrink_triton(x, a, h, token_slots, sorted_tokens, slot_starts, _grouped(x.shape[0]))
    return h


def _lora_expand(y, h, b, token_slots, sorted_tokens, slot_starts, slice_sizes):
    if not y.is_cuda:
        lora_expand_ref_(y, h, b, token_slots, list(slice_sizes))
        return
    from kiln.ops.triton_lora import lora_expand_triton

    lora_expand_triton(
        y, h, b, token_slots, sorted_tokens, slot_starts, list(slice_sizes), _grouped(y.shape[0])
    )


_lib.impl("lora_shrink", _lora_shrink, "CompositeExplicitAutograd")
_lib.impl("lora_expand", _lora_expand, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::lora_shrink")
def _lora_shrink_fake(x, a, token_slots, sorted_tokens, slot_starts):
    return x.new_empty((x.shape[0], a.shape[1], a.shape[2]), dtype=torch.float32)


@torch.library.register_fake("kiln::lora_expand")
def _lora_expand_fake(y, h, b, token_slots, sorted_tokens, slot_starts, slice_sizes) -> None:
    return None
