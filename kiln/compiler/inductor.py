"""Compile one FX graph with Inductor and tell whether the compile cache served it."""

import time
from dataclasses import dataclass

from torch._dynamo.utils import counters

from kiln.compiler.autotune_reuse import reuse_tuned_configs

_HIT = (("aot_autograd", "autograd_cache_hit"), ("inductor", "fxgraph_cache_hit"))
_MISS = (("aot_autograd", "autograd_cache_miss"), ("inductor", "fxgraph_cache_miss"))


@dataclass
class CompileResult:
    fn: object
    seconds: float
    cache_hit: bool


def _count(keys) -> int:
    return sum(counters[group][name] for group, name in keys)


def inductor_compile(gm, example_inputs, options: dict, post_grad_pass=None, dump=None, name: str = ""):
    """``compile_fx`` with kiln's Inductor options and post-grad passes; ``dump`` (a GraphDumper)
    receives the generated code when Inductor really compiles."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    patches = dict(options)
    if patches.get("coordinate_descent_tuning"):
        reuse_tuned_configs()
    if post_grad_pass is not None:
        patches["post_grad_custom_post_pass"] = post_grad_pass
    kwargs = {}
    if dump is not None and dump.enabled:

        def inner(graph, inputs, **kw):
            out = compile_fx_inner(graph, inputs, **kw)
            code = getattr(out, "source_code", None)
            dump.write(f"{name}_inductor_output", code or f"# no source available for {type(out).__name__}\n")
            return out

        kwargs["inner_compile"] = inner
    hits, misses = _count(_HIT), _count(_MISS)
    start = time.perf_counter()
    fn = compile_fx(gm, list(example_inputs), config_patches=patches, **kwargs)
    seconds = time.perf_counter() - start
    hit = _count(_HIT) > hits and _count(_MISS) == misses
    if hit and dump is not None and dump.enabled:
        dump.write(f"{name}_inductor_output", "# served from the compile cache: Inductor did not run\n")
    return CompileResult(fn, seconds, hit)
