"""kiln's Dynamo backend: FX passes, split at splitting ops, one compile per unique piece.

``KilnBackend(...)`` is given to ``torch.compile(backend=...)``. For each graph Dynamo captures it
returns either the graph itself (mode ``dynamo``), Inductor's compile of the whole graph (mode
``inductor``) or the split graph with compiled pieces (mode ``piecewise``), each piece inside a
piecewise ``CUDAGraphWrapper`` when piecewise graphs are planned.
"""

import copy
import logging
import time

import torch
from torch._guards import detect_fake_mode

from kiln.compiler.cache import CompileCache, CompileCacheMissError
from kiln.compiler.config import CompilationConfig, CompilationMode
from kiln.compiler.cudagraph import CudaGraphs
from kiln.compiler.debug import GraphDumper
from kiln.compiler.inductor import inductor_compile
from kiln.compiler.passes.fusion import FusionPasses
from kiln.compiler.passes.noop_elimination import eliminate_noops
from kiln.compiler.passes.split import Piece, split_graph
from kiln.compiler.piecewise import CompiledPiece, compile_pieces, graph_hash, token_arg
from kiln.compiler.report import CompileReport

logger = logging.getLogger("kiln.compiler")


class KilnBackend:
    def __init__(
        self,
        config: CompilationConfig,
        mode: CompilationMode,
        cache: CompileCache,
        report: CompileReport,
        dumper: GraphDumper,
        graphs: CudaGraphs | None = None,
    ):
        self.config, self.mode, self.cache, self.report, self.dumper = config, mode, cache, report, dumper
        self.graphs = graphs  # piecewise CUDA-graph wrappers go around each compiled piece
        self.fusions = FusionPasses(config.pass_config.enabled_fusions(), report.pattern_matches, dumper)
        self.trace_started: float | None = None  # set by the caller just before a traced call
        self.split_gm = None  # the latest piecewise runtime module
        self._general: dict[str, object] = {}  # graph hash -> general compile
        self._static: dict[tuple[str, int], object] = {}  # (graph hash, size) -> static compile

    # ------------------------------------------------------------------ entry point

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        entered = time.perf_counter()
        report = self.report
        report.graphs_captured += 1
        if report.graphs_captured > 1:
            report.recompilations += 1
            logger.warning("Dynamo re-traced the model forward (recompilation %d)", report.recompilations)
        if self.trace_started is not None:
            report.dynamo_s += entered - self.trace_started
            self.trace_started = None
        self.dumper.graph("dynamo_graph", gm)
        if self.mode == CompilationMode.DYNAMO:
            return gm
        fake_mode = detect_fake_mode(example_inputs)
        fake_inputs = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        start = time.perf_counter()
        if self.config.pass_config.eliminate_noops:
            removed = eliminate_noops(gm)
            report.noops_removed += removed
            self.dumper.graph(f"after_noop_elimination_{removed}_removed", gm)
        if self.mode == CompilationMode.INDUCTOR:
            report.passes_s += time.perf_counter() - start
            report.pieces += 1
            return self._compile(gm, fake_inputs, "graph", static_size=None)
        split_gm, pieces = split_graph(gm, self.config.splitting_ops)
        report.passes_s += time.perf_counter() - start
        self.dumper.graph("after_split", split_gm)
        report.splitting_pieces += sum(p.is_splitting for p in pieces)
        report.pieces += sum(not p.is_splitting for p in pieces)
        compile_pieces(
            split_gm, pieces, fake_inputs, fake_mode, lambda piece, args: self._install(split_gm, piece, args)
        )
        self.split_gm = split_gm
        return split_gm

    # ------------------------------------------------------------------ pieces

    def _install(self, split_gm, piece: Piece, fake_args) -> None:
        key = graph_hash(piece.graph, fake_args)
        self.dumper.graph(f"{piece.name}_{key}", piece.graph)
        general = self._general.get(key)
        if general is None:
            general = self._general[key] = self._compile(piece.graph, fake_args, f"{piece.name}_{key}", None)
        compiled = CompiledPiece(
            piece.name,
            piece.graph,
            general,
            key,
            token_arg(fake_args),
            self.config.compile_sizes,
            self._compile_static,
        )
        if self.graphs is not None:
            compiled = self.graphs.wrap(compiled, "piecewise")
        setattr(split_gm, piece.name, compiled)

    def _compile_static(self, piece: CompiledPiece, args, size: int):
        key = (piece.graph_hash, size)
        fn = self._static.get(key)
        if fn is None:
            name = f"{piece.name}_size{size}"
            fn = self._static[key] = self._compile(piece.graph, _static_fakes(args), name, size)
        return fn

    def _compile(self, gm, inputs, name: str, static_size: int | None):
        report = self.report
        if self.config.backend == "eager":
            fn = gm
        else:
            # Inductor rewrites a graph that returns a single value in place: give it a copy, so the
            # piece's graph stays as split (static compiles start from it too)
            gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
            with self.cache.activate():
                options = self.config.inductor_compile_config
                if static_size is not None:
                    options = self.config.static_inductor_options()
                result = inductor_compile(
                    gm,
                    inputs,
                    options,
                    self.fusions.inductor_pass(),
                    self.dumper,
                    name,
                )
            fn = result.fn
            if result.cache_hit:
                report.cache_load_s += result.seconds
                report.cache_hits += 1
            else:
                report.inductor_s += result.seconds
                report.cache_misses += 1
                if self.config.cache == "require" and self.cache.enabled:
                    raise CompileCacheMissError(
                        f"compilation_config.cache='require': compile cache entry {self.cache.dir} is "
                        f"incomplete (Inductor had to compile {name}); fill it again with `kiln compile`"
                    )
        if static_size is None:
            report.unique_compiles += 1
        else:
            report.static_compiles += 1
        return fn


def _static_fakes(args) -> list:
    """Fake copies of real inputs with static shapes, under a mode with a shape environment
    (Inductor's caches refuse graphs compiled without one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
