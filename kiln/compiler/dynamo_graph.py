"""Dynamo's traced graph kept in the compile cache, so a warm start does not trace the forward again.

With ``compilation_config.reuse_dynamo_graph`` the forward is captured with torch's AOT entry point
(``torch.compile(...).aot_compile``): Dynamo traces once, kiln's backend compiles the graph as usual, and
the result is saved as ``dynamo_forward.bin`` in the cache entry: Dynamo's guards and bytecode (torch's
part) and the graph Dynamo handed to the backend, with its fake example values (``ForwardArtifact``).
A warm start loads the file (``torch.compiler.load_compiled_function``) and gives the loaded graph to
the same backend, which splits it, runs the passes and loads each piece from Inductor's cache, exactly
as after a trace. Where torch lacks these entry points, or loading fails, the forward is traced.
"""

import contextvars
import functools
import logging
import os
import pickle
from contextlib import contextmanager

import torch

logger = logging.getLogger("kiln.compiler")

ARTIFACT = "dynamo_forward.bin"
_META_DROPPED = ("nn_module_stack", "source_fn_stack", "stack_trace")  # refer to live modules and frames
_loading_backend: contextvars.ContextVar = contextvars.ContextVar("kiln_loading_backend", default=None)


def supported() -> bool:
    try:
        from torch._dynamo.aot_compile_types import SerializableCallable  # noqa: F401
        from torch._dynamo.guards import CheckFunctionManager
        from torch.fx._graph_pickler import GraphPickler  # noqa: F401
    except ImportError:
        return False
    if not hasattr(torch.compiler, "load_compiled_function") or not hasattr(
        CheckFunctionManager, "UNSUPPORTED_SERIALIZATION_GUARD_TYPES"
    ):
        return False
    with aot_enabled():  # torch.compile's result has ``aot_compile`` only while the setting is on
        return hasattr(torch.compile(_identity, backend="eager"), "aot_compile")


def _identity(x):
    return x


@contextmanager
def aot_enabled():
    """torch's AOT entry points switched on (torch 2.11 has them off by default, 2.13 on)."""
    import torch._dynamo.config as dynamo_config

    if "enable_aot_compile" not in dynamo_config._config:
        yield
        return
    with dynamo_config.patch(enable_aot_compile=True):
        yield


def serializable_guard_filter(base):
    """``base`` (kiln's guard filter) that also drops the guards torch cannot save: globals and the
    types it lists as unsupported (module identity and the like)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES

    def keep(entries):
        return [
            k and not (e.is_global or e.guard_type in unsupported) for k, e in zip(base(entries), entries)
        ]

    return keep


@contextmanager
def plain_caches():
    """AOT capture and loading run the backend with settings for artifacts that bundle Inductor's output
    (and these settings key Inductor's caches); kiln saves only the graph and keeps Inductor's output in
    its caches, so its backend runs with the settings of a plain start, saving and loading alike: the
    pieces then load from the cache at a warm start."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    names = (
        "strict_autograd_cache",
        "bypass_autograd_cache_key",
        "bundled_autograd_cache",
        "force_non_lazy_backward_lowering",
        "force_autograd_cache",
    )
    functorch = {n: functorch_config._config[n].default for n in names if n in functorch_config._config}
    inductor = {
        n: inductor_config._config[n].default
        for n in ("enable_autograd_for_aot",)
        if n in inductor_config._config
    }
    with functorch_config.patch(functorch), inductor_config.patch(inductor):
        yield


def graph_bytes(gm: torch.fx.GraphModule) -> bytes:
    """The graph as Dynamo traced it (call before any pass changes it) with the fake values of its inputs;
    the other nodes' fake values (views of views cannot be pickled) are propagated again on load."""
    from torch.fx._graph_pickler import GraphPickler, Options

    saved = {}
    for node in gm.graph.nodes:
        for key in _META_DROPPED:
            node.meta.pop(key, None)
        if node.op != "placeholder" and "example_value" in node.meta:
            saved[node] = node.meta.pop("example_value")
    try:
        return GraphPickler.dumps(gm, Options(ops_filter=None))
    finally:
        for node, value in saved.items():  # the backend's passes read them next
            node.meta["example_value"] = value


def __getattr__(name: str):
    # the artifact class subclasses torch's SerializableCallable, whose module imports Dynamo (and
    # Triton): made on first use, so importing kiln stays light; pickle finds it here by name
    if name == "ForwardArtifact":
        return _artifact_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _artifact_class():
    from torch._dynamo.aot_compile_types import SerializableCallable

    class ForwardArtifact(_ForwardArtifact, SerializableCallable):
        pass

    ForwardArtifact.__module__, ForwardArtifact.__qualname__ = __name__, "ForwardArtifact"
    return ForwardArtifact


class _ForwardArtifact:
    """What kiln's backend returns in AOT mode: the compiled forward, and the traced graph it came from."""

    def __init__(self, graph: bytes, fn, inference: list[bool]):
        self.graph, self.fn = graph, fn
        self.inference = inference  # which inputs were inference tensors (Inductor's cache keys on it)

    @classmethod
    def serialize_compile_artifacts(cls, fn: "_ForwardArtifact") -> bytes:
        return pickle.dumps({"graph": fn.graph, "inference": fn.inference})

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> "_ForwardArtifact":
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        backend = _loading_backend.get()
        if backend is None:
            raise RuntimeError("a kiln forward artifact loads only through CompiledForward")
        saved = pickle.loads(data)
        graph, inference = saved["graph"], saved["inference"]
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        gm = GraphPickler.loads(graph, fake_mode)
        gm.recompile()
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        with fake_mode, torch.inference_mode():
            for node, was_inference in zip(placeholders, inference):
                value = node.meta["example_value"]
                if was_inference and not value.is_inference():  # the unpickled fake is a normal tensor
                    node.meta["example_value"] = torch.empty_strided(
                        value.shape, value.stride(), dtype=value.dtype, device=value.device
                    )
        inputs = [node.meta["example_value"] for node in placeholders]
        FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*inputs)
        for node in gm.graph.nodes:
            if "val" in node.meta:
                node.meta.setdefault("example_value", node.meta["val"])
        with plain_caches():
            return cls(graph, backend(gm, inputs), inference)

    def __call__(self, *args):
        return self.fn(*args)


def load(directory: str, backend, f_globals: dict):
    """The saved forward of a cache entry, its graph compiled by ``backend`` (None when absent)."""
    path = os.path.join(directory, ARTIFACT)
    if not os.path.isfile(path):
        return None
    token = _loading_backend.set(backend)
    try:
        with open(path, "rb") as f, aot_enabled():
            return torch.compiler.load_compiled_function(f, f_globals=f_globals)
    finally:
        _loading_backend.reset(token)


def save(directory: str, artifact) -> None:
    os.makedirs(directory, exist_ok=True)
    with aot_enabled():
        artifact.save_compiled_function(os.path.join(directory, ARTIFACT))  # written to a temp file, renamed
