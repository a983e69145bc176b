"""Split pass: cut a graph at every splitting op (attention by default) into ordered pieces.

Each splitting op gets a piece of its own; the nodes between two splitting ops form one piece.
The result is a ``GraphModule`` whose ``forward`` calls ``submod_0``, ``submod_1``, ... in the
original order, so the runtime (and a later CUDA-graph wrapper) can replace any piece's module.
"""

from dataclasses import dataclass

from torch.fx import GraphModule
from torch.fx.passes.split_module import split_module

from kiln.compiler.passes.graph_utils import op_name


@dataclass
class Piece:
    name: str  # attribute of the split module, e.g. "submod_2"
    graph: GraphModule
    is_splitting: bool  # holds only a splitting op (runs as is, never compiled)


def normalize_op_names(ops) -> set[str]:
    """``kiln::attention``, ``kiln::attention.default`` and ``kiln.attention`` all name one op."""
    names = set()
    for op in ops:
        op = op.replace(".default", "")
        if "::" not in op and "." in op:
            ns, _, name = op.partition(".")
            op = f"{ns}::{name}"
        names.add(op)
    return names


def is_splitting_node(node, ops: set[str]) -> bool:
    return node.op == "call_function" and op_name(node.target) in ops


def split_graph(gm: GraphModule, splitting_ops) -> tuple[GraphModule, list[Piece]]:
    ops = normalize_op_names(splitting_ops)
    partition: dict = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_splitting_node(node, ops):
            current += 1
            partition[node] = current
            current += 1
        else:
            partition[node] = current
    split = split_module(gm, None, lambda node: partition[node], keep_original_order=True)
    pieces = []
    for node in split.graph.nodes:
        if node.op == "call_module":
            sub = getattr(split, node.target)
            splitting = any(is_splitting_node(n, ops) for n in sub.graph.nodes)
            pieces.append(Piece(node.target, sub, splitting))
    return split, pieces
