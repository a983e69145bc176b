"""``kiln::lora_add``: the batched LoRA delta as one custom op.

``lora_add(y, x, a, b, token_slots, sorted_tokens, slot_starts, slice_sizes)`` adds
``x @ A[slot].T @ B[slot].T`` to every row of ``y`` whose token has an adapter, in place. It takes the
slot tables and the per-token slot buffers as tensors: they live at fixed addresses, so a compiled
graph or a CUDA graph sees new adapters and new batches without being rebuilt. Registered through
``torch.library`` with a fake implementation, so Dynamo traces around it and Inductor compiles (and
fuses) everything else. CUDA runs the Triton kernels (``kiln/ops/triton_lora.py``: one fused kernel for
the smallest decode batches, two or three kernels above), anything else the torch reference
(``kiln/ops/lora_ref.py``).

``lora_expand_stacked(out, b, token_slots, sorted_tokens, slot_starts, n, slice_sizes)`` is the delta
when the base weight carries every slot's ``A`` as extra rows: ``out`` is the product over ``[W; A]``,
its first ``n`` columns get each token's ``out[t, its slot's columns] @ B[slot].T`` in place (one
kernel, the shrink rode along; gathered per token for few tokens, grouped by slot above).
"""

import torch

from kiln.ops.lora_ref import lora_add_ref_, lora_expand_stacked_ref_

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

_lib.define(
    "lora_expand_stacked(Tensor(a!) out, Tensor b, Tensor token_slots, Tensor sorted_tokens, "
    "Tensor slot_starts, int n, int[] slice_sizes) -> ()"
)


def _lora_expand_stacked(out, b, token_slots, sorted_tokens, slot_starts, n, slice_sizes):
    y, h = out[:, :n], out[:, n:]
    if not out.is_cuda:
        lora_expand_stacked_ref_(y, h, b, token_slots, list(slice_sizes))
        return
    from kiln.ops.triton_lora import lora_expand_stacked_triton

    lora_expand_stacked_triton(y, h, b, token_slots, sorted_tokens, slot_starts, list(slice_sizes))


_lib.impl("lora_expand_stacked", _lora_expand_stacked, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::lora_expand_stacked")
def _lora_expand_stacked_fake(out, b, token_slots, sorted_tokens, slot_starts, n, slice_sizes) -> None:
    return None


@torch.library.register_fake("kiln::lora_add")
def _lora_add_fake(y, x, a, b, token_slots, sorted_tokens, slot_starts, slice_sizes) -> None:
    return None
