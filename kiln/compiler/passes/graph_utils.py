"""Small helpers shared by the passes: node metadata and operator names."""

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def node_value(node: torch.fx.Node):
    """The fake value a tracer recorded for ``node`` (Dynamo: example_value, make_fx: val)."""
    for key in ("example_value", "val"):
        if key in node.meta:
            return node.meta[key]
    meta = node.meta.get("tensor_meta")  # ShapeProp
    return meta


def _same_ints(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def same_layout(a, b) -> bool:
    """True when both values are tensors (or tensor metadata) with provably identical shape,
    stride, dtype and device; never adds a shape guard."""
    if a is None or b is None:
        return False
    try:
        return (
            a.dtype == b.dtype
            and getattr(a, "device", None) == getattr(b, "device", None)
            and _same_ints(tuple(a.shape), tuple(b.shape))
            and _same_ints(
                tuple(a.stride()) if callable(a.stride) else tuple(a.stride),
                tuple(b.stride()) if callable(b.stride) else tuple(b.stride),
            )
        )
    except (AttributeError, TypeError):
        return False


def op_name(target) -> str | None:
    """``ns::name`` of an operator target (packet or overload), else None."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return None
