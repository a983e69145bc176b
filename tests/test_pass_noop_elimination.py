"""No-op elimination on small Dynamo-captured and ATen graphs."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kiln.compiler.passes.noop_elimination import eliminate_noops


def capture(fn, *args, dynamic=False):
    """The graph Dynamo captures for ``fn`` (with its example_value metadata)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    if dynamic:
        for a in args:
            torch._dynamo.mark_dynamic(a, 0)
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")]


def test_removes_identity_casts_views_and_slices():
    def fn(x):
        y = x.float().to(torch.float32).contiguous()
        y = y.view(-1, 8)[:]
        return y.reshape(y.shape) + 1

    x = torch.randn(4, 8)
    gm = capture(fn, x)
    assert eliminate_noops(gm) == 6
    assert [str(t) for t in targets(gm)] == ["<built-in function add>"]
    torch.testing.assert_close(gm(x)[0], fn(x))


def test_keeps_ops_that_change_something():
    def fn(x):
        a = x.to(torch.float16)  # dtype change
        b = x.t().contiguous()  # real copy
        c = x.view(2, -1)  # shape change
        d = x[1:]  # real slice
        return a, b, c, d

    gm = capture(fn, torch.randn(4, 8))
    assert eliminate_noops(gm) == 0


def test_symbolic_token_dim_without_guards():
    def fn(x):
        return x.view(-1, 8).float() * 2

    x = torch.randn(5, 8)
    gm = capture(fn, x, dynamic=True)
    shape_env = next(
        n.meta["example_value"].fake_mode.shape_env
        for n in gm.graph.nodes
        if n.op == "placeholder"
        if isinstance(n.meta.get("example_value"), torch.Tensor)
    )
    guards_before = len(shape_env.guards)
    assert eliminate_noops(gm) == 2
    assert len(shape_env.guards) == guards_before
    for n in (1, 3, 17):  # inputs: the symbolic size, then x
        x = torch.randn(n, 8)
        torch.testing.assert_close(gm(n, x)[0], x * 2)


def test_aten_graph():
    def fn(x):
        return torch.ops.aten.view.default(x, [4, 8]) * 2, torch.ops.aten.slice.Tensor(
            x, 0, 0, 9223372036854775807
        )

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(4, 8))
    assert eliminate_noops(gm) == 2
    assert all("view" not in str(t) and "slice" not in str(t) for t in targets(gm))
