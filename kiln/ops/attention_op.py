"""``torch.ops.kiln.attention``: the one custom op every model layer calls for attention.

It runs the forward context's attention backend (``kiln.ops.attention_backend``), which stores this
step's K/V into the layer's paged cache and writes attention output into ``out`` (an fp8 cache stores
them divided by the layer's ``k_scale`` / ``v_scale``).
Registered through ``torch.library`` with a fake implementation, so Dynamo treats it as opaque and
the compiler can split graphs at it.
"""

import torch

from kiln.ops.forward_context import get_forward_context

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor(a!) out, int layer_idx, float scale, "
    "int sliding_window, float k_scale=1.0, float v_scale=1.0) -> ()"
)


def _attention(
    q,
    k,
    v,
    out,
    layer_idx: int,
    scale: float,
    sliding_window: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    ctx = get_forward_context()
    ctx.backend.forward(
        q, k, v, out, ctx.kv_caches[layer_idx], ctx.metadata, scale, sliding_window, k_scale, v_scale
    )


_lib.impl("attention", _attention, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::attention")
def _attention_fake(q, k, v, out, layer_idx, scale, sliding_window, k_scale=1.0, v_scale=1.0) -> None:
    return None


def attention(
    q,
    k,
    v,
    out,
    layer_idx: int,
    scale: float,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """``k_scale`` / ``v_scale``: the layer's fp8 KV-cache scales (unused by caches in the model dtype)."""
    torch.ops.kiln.attention(q, k, v, out, layer_idx, scale, sliding_window, k_scale, v_scale)
    return out
