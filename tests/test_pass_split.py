"""Split pass on small graphs: cut at each splitting op, keep order, run the same as unsplit."""

import torch

from kiln.compiler.passes.split import normalize_op_names, split_graph

_lib = torch.library.Library("kilntest", "FRAGMENT")
_lib.define("marker(Tensor x, Tensor(a!) out) -> ()")


def _marker(x, out):
    out.copy_(x * 10)


_lib.impl("marker", _marker, "CompositeExplicitAutograd")


@torch.library.register_fake("kilntest::marker")
def _(x, out):
    return None


def fn(x, w):
    h = x @ w
    out = torch.empty_like(h)
    torch.ops.kilntest.marker(h.relu(), out)
    h = out + h
    out2 = torch.empty_like(h)
    torch.ops.kilntest.marker(h.sin(), out2)
    return out2.cos() * 2


def capture(f, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def test_split_at_each_splitting_op_in_order():
    x, w = torch.randn(3, 4), torch.randn(4, 4)
    gm = capture(fn, x, w)
    split, pieces = split_graph(gm, ["kilntest::marker"])
    assert [p.is_splitting for p in pieces] == [False, True, False, True, False]
    assert [p.name for p in pieces] == [f"submod_{i}" for i in range(5)]
    called = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert called == [p.name for p in pieces]
    for p in pieces:
        ops = [n for n in p.graph.graph.nodes if n.op == "call_function" and "marker" in str(n.target)]
        assert len(ops) == (1 if p.is_splitting else 0)
    torch.testing.assert_close(split(x, w)[0], fn(x, w))


def test_no_splitting_op_gives_one_piece():
    gm = capture(fn, torch.randn(3, 4), torch.randn(4, 4))
    split, pieces = split_graph(gm, ["kiln::attention"])
    assert len(pieces) == 1 and not pieces[0].is_splitting


def test_op_name_spellings():
    assert normalize_op_names(["kiln::attention.default", "kiln.attention", "a::b"]) == {
        "kiln::attention",
        "a::b",
    }
