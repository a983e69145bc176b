"""``torch.ops.kiln.attention``: the one custom op every model layer calls for attention.

It runs the forward context's attention backend (``kiln.ops.attention_backend``), which stores this
step's K/V into the layer's paged cache and writes attention output into ``out``.
Registered through ``torch.library`` with a fake implementation, so Dynamo treats it as opaque and
the compiler can split graphs at it.
"""

import torch

from kiln.ops.forward_context import get_forward_context

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor(a!) out, int layer_idx, float scale, "
    "int sliding_window) -> ()"
)


def _attention(q, k, v, out, layer_idx: int, scale: float, sliding_window: int) -> None:
    ctx = get_forward_context()
    ctx.backend.forward(q, k, v, out, ctx.kv_caches[layer_idx], ctx.metadata, scale, sliding_window)


_lib.impl("attention", _attention, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::attention")
def _attention_fake(q, k, v, out, layer_idx, scale, sliding_window) -> None:
    return None


def attention(q, k, v, out, layer_idx: int, scale: float, sliding_window: int = 0) -> torch.Tensor:
    torch.ops.kiln.attention(q, k, v, out, layer_idx, scale, sliding_window)
    return out
