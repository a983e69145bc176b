"""No-op elimination: drop views, reshapes, casts and slices whose result has exactly the input's
layout (``x.float()`` on a float32 tensor, ``x.view(same shape)``, ``x[:]``, ``x.to(x.dtype)``).

Works on Dynamo's graph (``call_method`` / torch functions) and on ATen graphs. Each candidate is
removed only when the recorded fake values prove shape, stride, dtype and device equal, checked
without adding shape guards, so one graph stays valid for every batch size.
"""

import operator

import torch
from torch.fx import GraphModule, Node

from kiln.compiler.passes.graph_utils import node_value, same_layout

# Tensor methods that return the input itself (or an identical view) when the layout does not change
_METHODS = {
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type",
    "type_as",
    "contiguous",
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "expand",
    "expand_as",
    "flatten",
}
_FUNCTIONS = {torch.reshape, torch.flatten, torch.Tensor.contiguous, torch.Tensor.view, torch.Tensor.to}
_ATEN = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.prims.convert_element_type.default,
}


def _is_full_slice(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


def _candidate(node: Node) -> bool:
    if node.op == "call_method":
        if node.target not in _METHODS:
            return False
        return not node.kwargs.get("copy", False)  # .to(..., copy=True) must copy
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return len(node.args) == 2 and _is_full_slice(node.args[1])
    return node.target in _FUNCTIONS or node.target in _ATEN


def eliminate_noops(gm: GraphModule) -> int:
    """Remove no-op nodes in place; return how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if not _candidate(node) or not node.args or not isinstance(node.args[0], Node):
            continue
        source = node.args[0]
        if same_layout(node_value(node), node_value(source)):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed
