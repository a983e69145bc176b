"""Piecewise runtime pieces: name-blind graph hashing and the per-size dispatch of a compiled piece."""

import torch

from kiln.compiler.piecewise import CompiledPiece, graph_hash, token_arg


def _graph(names, op=torch.add):
    g = torch.fx.Graph()
    a, b = (g.placeholder(n) for n in names)
    g.output(g.call_function(op, (g.call_function(torch.relu, (a,)), b)))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_hash_ignores_names_but_not_ops_or_layouts():
    x, w = torch.empty(4, 8), torch.empty(4, 8)
    base = graph_hash(_graph(["layer0_x", "layer0_w"]), [x, w])
    assert graph_hash(_graph(["layer7_x", "layer7_w"]), [x, w]) == base
    assert graph_hash(_graph(["a", "b"], op=torch.mul), [x, w]) != base
    assert graph_hash(_graph(["a", "b"]), [x, torch.empty(4, 8, dtype=torch.bfloat16)]) != base
    assert graph_hash(_graph(["a", "b"]), [x, torch.empty(8, 4).t()]) != base


def test_token_arg_finds_the_symbolic_token_count():
    seen = []

    def backend(gm, example_inputs):
        seen.append(list(example_inputs))
        return gm.forward

    x = torch.randn(5, 8)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.reset()
    torch.compile(lambda x: x.view(-1, 8) * 2, backend=backend, fullgraph=True)(x)
    index, is_int = token_arg(seen[0])
    assert is_int and isinstance(seen[0][index], torch.SymInt)
    assert token_arg([torch.empty(3), 5]) is None  # static shapes: nothing to dispatch on


def test_static_sizes_dispatch_and_compile_once():
    compiled = []

    def compile_static(piece, args, size):
        compiled.append(size)
        return lambda *a: ("static", size)

    piece = CompiledPiece(
        "submod_0", _graph(["a", "b"]), lambda *a: "general", "h", (0, False), [4, 8], compile_static
    )
    assert piece(torch.empty(3, 2), None) == "general"
    assert piece(torch.empty(4, 2), None) == ("static", 4)
    assert piece(torch.empty(4, 2), None) == ("static", 4)
    assert piece(torch.empty(8, 2), None) == ("static", 8)
    assert compiled == [4, 8]
    no_token = CompiledPiece(
        "submod_2", _graph(["a", "b"]), lambda *a: "general", "h", None, [4], compile_static
    )
    assert no_token(torch.empty(4, 2), None) == "general" and compiled == [4, 8]
