"""``CompiledForward``: the model forward captured once by Dynamo and compiled by kiln's backend.

One trace serves every batch size: dim 0 of ``input_ids`` and ``positions`` is marked dynamic and
the shape-environment guards (``2 <= T``, ``len(positions) == len(input_ids)``) are dropped, so no
token count re-traces. Start-up runs the trace (and the ``compile_sizes`` compiles) on dummy
inputs with a scratch KV cache, so serving never compiles.
"""

import logging
import time
import types
from contextlib import nullcontext

import torch

from kiln.compiler import dynamo_graph
from kiln.compiler.cache import CompileCache, CompileCacheMissError, cache_key_details
from kiln.compiler.config import CompilationConfig, CompilationMode
from kiln.compiler.cudagraph import CudaGraphs
from kiln.compiler.debug import GraphDumper
from kiln.compiler.report import CompileReport
from kiln.ops.attention_backend import AttentionBackend, get_attention_backend
from kiln.ops.forward_context import forward_context

logger = logging.getLogger("kiln.compiler")

CAPTURE_TOKENS = 256  # token count of the dummy batch Dynamo traces (any size >= 2 would do)


_INPUTS = {"input_ids", "positions", "L['input_ids']", "L['positions']"}


def _guard_filter(entries):
    """Dynamo guard filter. Dropped: the shape environment's guards, which would pin the token count
    (0/1 specialisation re-traces a batch of one token), and the tensor guards of the two inputs,
    which would re-trace when an inference tensor follows a normal one (the engine always passes
    1-D int64 tensors on the model's device). Every other guard stays."""
    return [
        not (e.guard_type == "SHAPE_ENV" or (e.guard_type == "TENSOR_MATCH" and e.name in _INPUTS))
        for e in entries
    ]


def _private_forward(model):
    """``model.forward`` bound to a private copy of its function. Dynamo caches compiled code per
    code object, so without a copy every model built in one process would share one cache (and its
    limit of 8 entries: the ninth LLM would fail to compile)."""
    func = type(model).forward
    copy = types.FunctionType(
        func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    copy.__kwdefaults__, copy.__qualname__ = func.__kwdefaults__, func.__qualname__
    return types.MethodType(copy, model)


class CompiledForward:
    """Callable ``(input_ids, positions) -> hidden``, a drop-in for ``model.forward``."""

    def __init__(
        self,
        model,
        model_config,
        config: CompilationConfig,
        mode: CompilationMode,
        dtype: torch.dtype,
        device: torch.device,
        attention_backend: "str | AttentionBackend" = "torch",
        graphs: CudaGraphs | None = None,
        lora=None,
        trace_tokens: int = CAPTURE_TOKENS,
        cache_details: dict | None = None,
    ):
        self.model, self.model_config, self.config, self.mode = model, model_config, config, mode
        self.device, self.attention = device, get_attention_backend(attention_backend)
        self.trace_tokens = max(2, trace_tokens)
        if cache_details is None:
            cache_details = cache_key_details(
                model_config, dtype, device, config, lora, model, self.trace_tokens
            )
        self.cache = CompileCache(config.resolved_cache_dir(), cache_details, config.use_cache)
        self.report = CompileReport(
            mode=mode.label, backend=config.backend, compile_sizes=list(config.compile_sizes)
        )
        if config.use_cache:
            self.report.cache_dir, self.report.cache_key = self.cache.dir, self.cache.key
        self.dumper = GraphDumper(config.debug_dump_path)
        from kiln.compiler.backend import KilnBackend  # imports Inductor: only when compiling

        self.backend = KilnBackend(config, mode, self.cache, self.report, self.dumper, graphs)
        self._forward = _private_forward(model)
        self._compiled = torch.compile(
            self._forward,
            backend=self.backend,
            fullgraph=True,
            dynamic=False,
            options={"guard_filter_fn": _guard_filter},
        )
        self._traced = False
        self.aot = config.reuse_dynamo_graph and config.use_cache and dynamo_graph.supported()
        if config.reuse_dynamo_graph and not self.aot:
            self.report.dynamo_graph = "traced (this torch cannot save Dynamo graphs)"
        self._aot_fn = None  # the saved (or just saved) forward, called with the model first

    @property
    def split_module(self):
        """The piecewise runtime (a GraphModule whose ``submod_<i>`` are the pieces), or None."""
        return self.backend.split_gm

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.aot:
            if self._aot_fn is None:
                self._aot_fn = self._load_or_capture(input_ids, positions)
            return self._aot_fn(self.model, input_ids, positions)
        if not self._traced:
            torch._dynamo.mark_dynamic(input_ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            self.backend.trace_started = time.perf_counter()
        out = self._compiled(input_ids, positions)
        self._traced = True
        return out

    def _load_or_capture(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """The forward saved in the cache entry, its guards checked once; else traced now and saved."""
        report = self.report
        fn = None
        try:
            fn = dynamo_graph.load(self.cache.dir, self.backend, self._forward.__func__.__globals__)
            if fn is not None and not fn.guard_check(self.model, input_ids, positions):
                report.dynamo_graph = "traced (the saved graph's guards failed)"
                fn = None
        except Exception as e:  # a damaged or foreign file: trace instead
            logger.warning("kiln: the saved Dynamo graph did not load (%s: %s); tracing", type(e).__name__, e)
            report.dynamo_graph = f"traced (loading the saved graph failed: {type(e).__name__})"
            fn = None
        if fn is not None:
            report.dynamo_graph = "loaded"
        else:
            torch._dynamo.mark_dynamic(input_ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            with dynamo_graph.aot_enabled():
                aot = torch.compile(
                    self._forward,
                    backend=self._aot_backend,
                    fullgraph=True,
                    dynamic=False,
                    options={"guard_filter_fn": dynamo_graph.serializable_guard_filter(_guard_filter)},
                )
                self.backend.trace_started = time.perf_counter()
                fn = aot.aot_compile(((input_ids, positions), {}))
            dynamo_graph.save(self.cache.dir, fn)
            report.dynamo_graph = report.dynamo_graph or "traced and saved"
        fn.disable_guard_check()  # checked once: the inputs are always 1-D int64 tensors on the device
        return fn

    def _aot_backend(self, gm, example_inputs):
        graph = dynamo_graph.graph_bytes(gm)  # before the passes change it
        inference = [isinstance(t, torch.Tensor) and t.is_inference() for t in example_inputs]
        with dynamo_graph.plain_caches():
            return dynamo_graph.ForwardArtifact(graph, self.backend(gm, example_inputs), inference)

    # ------------------------------------------------------------------ start-up

    @torch.inference_mode()
    def _dummy_run(self, num_tokens: int) -> None:
        """One forward over ``num_tokens`` dummy tokens that stores nothing (a one-block scratch cache)."""
        cfg, dev = self.model_config, self.device
        dtype = next(self.model.parameters()).dtype
        block = self.attention.block_size
        scratch = torch.zeros(2, 1, block, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
        md = self.attention.dummy(num_tokens)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        positions = torch.arange(num_tokens, device=dev) % cfg.max_position_embeddings
        with forward_context(md, [scratch] * cfg.num_layers, self.attention):
            self(ids, positions)

    @property
    def uses_inductor(self) -> bool:
        return self.config.backend == "inductor" and self.mode != CompilationMode.DYNAMO

    def warmup(self) -> CompileReport:
        """Trace and compile now: one dummy batch for the trace, one per compile size. A cache miss
        compiles under the entry's lock (a process that waited for it loads what the first one wrote);
        with ``cache="require"`` a miss raises ``CompileCacheMissError`` before anything compiles."""
        report = self.report
        start = time.perf_counter()
        found, report.cache_reason = self.cache.lookup()
        cached = self.config.use_cache and self.uses_inductor
        if cached and not found and self.config.cache == "require":
            raise CompileCacheMissError(
                f"compilation_config.cache='require' and the compile cache {self.cache.root} has no entry "
                f"for this start ({report.cache_reason}); fill it with `kiln compile` using the same model "
                "and settings, or use cache='auto'"
            )
        if cached:
            logger.info("kiln compile cache: %s", report.cache_reason)
        with self.cache.entry_lock() if cached and not found else nullcontext():
            if cached and not found:  # another process may have filled the entry while this one waited
                found, reason = self.cache.lookup()
                if found:
                    report.cache_reason = f"{reason} (written by another process while this one waited)"
            manifest = self.cache.manifest()
            try:
                with self.cache.activate():
                    self._dummy_run(self.trace_tokens)
                    if self.mode == CompilationMode.PIECEWISE:
                        for size in self.config.compile_sizes:
                            self._dummy_run(size)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if isinstance(e.inner_exception, CompileCacheMissError):
                    raise e.inner_exception from None
                raise
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            report.total_s = time.perf_counter() - start
            fusions = self.backend.fusions.seconds  # ran inside Inductor: move from its time to the passes'
            report.passes_s += fusions
            report.inductor_s = max(0.0, report.inductor_s - fusions)
            stages = report.dynamo_s + report.passes_s + report.inductor_s + report.cache_load_s
            report.warmup_run_s = max(0.0, report.total_s - stages)
            if not cached:
                report.cache_status = "disabled"
                if self.config.use_cache:
                    report.cache_reason = f"disabled (nothing compiled by Inductor in mode {self.mode.label})"
            elif report.cache_misses == 0:
                report.cache_status = "hit"
                if manifest is not None:  # fusion passes ran at the cold start only: report what they did
                    for name, count in manifest.get("report", {}).get("pattern_matches", {}).items():
                        if name in report.pattern_matches:
                            report.pattern_matches[name] = count
            else:
                report.cache_status = "partial" if manifest is not None else "miss"
                if manifest is not None:
                    report.cache_reason = (
                        f"partial: entry {self.cache.key} lacked {report.cache_misses} of "
                        f"{report.cache_misses + report.cache_hits} compiles"
                    )
                self.cache.save_manifest({"report": report.to_dict()})
            if self.config.use_cache and not cached and manifest is None:
                self.cache.save_manifest({"report": report.to_dict()})  # measurements still key on it
        logger.info("kiln compile: %s", report.summary())
        return report


def trace_tokens_for(engine_config) -> int:
    """Token count of the dummy batch Dynamo traces: the size hint Inductor compiles with."""
    return max(2, min(CAPTURE_TOKENS, engine_config.max_num_batched_tokens))


def engine_cache_details(engine_config, model_config, model) -> dict:
    """The compile-cache key details of an engine's forward (what ``compile_forward`` keys on)."""
    cfg = engine_config
    details = cache_key_details(
        model_config, cfg.dtype, cfg.device, cfg.compilation_config, cfg.lora, model, trace_tokens_for(cfg)
    )
    details["tensor_parallel_size"] = getattr(cfg, "tensor_parallel_size", 1)  # the graph's collectives
    return details


def compile_forward(model, model_config, engine_config, attention, graphs: CudaGraphs | None = None):
    """The compiled forward of ``engine_config.plan`` (None when the plan's mode is none), traced and
    compiled now, its piecewise CUDA-graph wrappers installed (captured later)."""
    plan = engine_config.plan
    if plan.mode == CompilationMode.NONE:
        return None
    forward = CompiledForward(
        model,
        model_config,
        engine_config.compilation_config,
        plan.mode,
        engine_config.dtype,
        engine_config.device,
        attention,
        graphs,
        engine_config.lora,
        trace_tokens_for(engine_config),
        engine_cache_details(engine_config, model_config, model),
    )
    forward.warmup()
    return forward
