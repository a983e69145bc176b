"""``kiln::lora_add``: the batched LoRA delta as one custom op.

``lora_add(y, x, a, b, token_slots, sorted_tokens, slot_starts, slice_sizes)`` adds
``x @ A[slot].T @ B[slot].T`` to every row of ``y`` whose token has an adapter, in place. It takes the
slot tables and the per-token slot buffers as tensors: they live at fixed addresses, so a compiled
graph or a CUDA graph sees new adapters and new batches without being rebuilt. Registered through
``torch.library`` with a fake implementation, so Dynamo traces around it and Inductor compiles (and
fuses) everything else. CUDA runs the Triton kernels (``kiln/ops/triton_lora.py``: one fused kernel for
the smallest decode batches, two or three kernels above), anything else the torch reference
(``kiln/ops/lora_ref.py``).
"""

import torch

from kiln.ops.lora_ref import lora_add_ref_

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "lora_add(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor token_slots, Tensor sorted_tokens, "
    "Tensor slot_starts, int[] slice_sizes) -> ()"
)


def _lora_add(y, x, a, b, token_slots, sorted_tokens, slot_starts, slice_sizes):
    if not y.is_cuda:
        lora_add_ref_(y, x, a, b, token_slots, list(slice_sizes))
        return
    from kiln.ops.triton_lora import lora_add_triton

    lora_add_triton(y, x.contiguous(), a, b, token_slots, sorted_tokens, slot_starts, list(slice_sizes))


_lib.impl("lora_add", _lora_add, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::lora_add")
def _lora_add_fake(y, x, a, b, token_slots, sorted_tokens, slot_starts, slice_sizes) -> None:
    return None
