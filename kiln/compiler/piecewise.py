"""Piecewise runtime: the split graph with each compiled piece swapped in as a ``CompiledPiece``.

``split_gm.submod_<i>`` is either the FX module of a splitting op (runs as is) or a
``CompiledPiece`` wrapping the piece's compiled callables: one general compile for symbolic token
counts, plus static-shape compiles for ``compile_sizes``. A CUDA-graph wrapper can replace any
``submod_<i>`` with its own module that calls the piece.

Pieces are compiled with the symbolic fake inputs Dynamo traced, propagated through the split
module under Dynamo's own fake mode (real inputs would specialise them to one batch size).
"""

import hashlib
from collections.abc import Callable

import torch
from torch.fx import GraphModule, Interpreter, Node

from kiln.compiler.passes.split import Piece


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def _describe_value(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{tuple(value.stride())}{value.dtype}{value.device.type}"
    if isinstance(value, torch.SymInt):
        return f"S({value.node.expr})"
    return f"V{value!r}"


def _describe_arg(arg, index: dict) -> str:
    if isinstance(arg, Node):
        return f"%{index[arg]}"
    if isinstance(arg, (list, tuple)):
        inner = ",".join(_describe_arg(a, index) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
    if isinstance(arg, dict):
        return "{" + ",".join(f"{k}:{_describe_arg(v, index)}" for k, v in sorted(arg.items())) + "}"
    if isinstance(arg, slice):
        return "slice" + _describe_arg((arg.start, arg.stop, arg.step), index)
    if isinstance(arg, torch.Tensor):
        data = hashlib.sha256(arg.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return f"tensor{_describe_value(arg)}{data.hexdigest()}"
    return repr(arg)


def graph_hash(gm: GraphModule, example_inputs) -> str:
    """Hash of a graph's structure and input layouts, blind to node names: the pieces of different
    layers (which differ only in the names of their weight inputs) hash alike."""
    index: dict[Node, int] = {}
    lines = [",".join(_describe_value(v) for v in example_inputs)]
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            lines.append(f"get_attr {_describe_arg(value, index)}")
        elif node.op != "placeholder":
            lines.append(
                f"{node.op} {_target_name(node.target)} {_describe_arg(node.args, index)} "
                f"{_describe_arg(node.kwargs, index)}"
            )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def token_arg(example_inputs) -> tuple[int, bool] | None:
    """Where a piece finds the token count at run time: (argument index, is a SymInt argument)."""
    for i, value in enumerate(example_inputs):
        if isinstance(value, torch.SymInt):
            return i, True
    for i, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[0], torch.SymInt):
            return i, False
    return None


class CompiledPiece(torch.nn.Module):
    """One compiled piece. ``forward(*args)`` picks the static compile for this token count when one
    exists (compiling it on first use for a size in ``static_sizes``), else the general compile."""

    def __init__(
        self,
        name: str,
        graph: GraphModule,
        general: Callable,
        graph_hash: str,
        token_index: tuple[int, bool] | None,
        static_sizes=(),
        compile_static=None,
    ):
        super().__init__()
        self.name, self.general, self.graph_hash = name, general, graph_hash
        object.__setattr__(self, "graph", graph)  # kept for inspection, not a submodule
        self.token_index = token_index
        self.static_sizes = frozenset(static_sizes) if token_index is not None else frozenset()
        self.static: dict[int, Callable] = {}
        self._compile_static = compile_static

    def num_tokens(self, args) -> int | None:
        if self.token_index is None:
            return None
        i, is_int = self.token_index
        return int(args[i]) if is_int else args[i].shape[0]

    def forward(self, *args):
        if self.static_sizes:
            n = self.num_tokens(args)
            fn = self.static.get(n)
            if fn is None and n in self.static_sizes:
                fn = self.static[n] = self._compile_static(self, args, n)
            if fn is not None:
                return fn(*args)
        return self.general(*args)


class _PieceCompiler(Interpreter):
    """Runs the split module on fake inputs; compiles each non-splitting piece with its inputs."""

    def __init__(self, split_gm: GraphModule, pieces: list[Piece], compile_piece):
        super().__init__(split_gm)
        self.pieces = {p.name: p for p in pieces}
        self.compile_piece = compile_piece

    def call_module(self, target, args, kwargs):
        assert not kwargs, "split_module passes inputs positionally"
        out = super().call_module(target, args, kwargs)
        piece = self.pieces[target]
        if not piece.is_splitting:
            self.compile_piece(piece, args)
        return out


def compile_pieces(split_gm: GraphModule, pieces: list[Piece], fake_inputs, fake_mode, compile_piece) -> None:
    """Call ``compile_piece(piece, fake_args)`` for every piece to compile, in graph order."""
    with fake_mode:
        _PieceCompiler(split_gm, pieces, compile_piece).run(*fake_inputs)
