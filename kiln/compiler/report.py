"""``CompileReport``: what start-up compilation did, for ``LLM.compile_report()`` and one log line."""

from dataclasses import asdict, dataclass, field


@dataclass
class CompileReport:
    mode: str = "none"
    backend: str = ""
    graphs_captured: int = 0  # Dynamo traces (1 when nothing recompiled)
    recompilations: int = 0  # traces after the first one
    pieces: int = 0  # pieces of the split graph that are compiled (splitting ops excluded)
    splitting_pieces: int = 0  # pieces holding one splitting op (run as is)
    unique_compiles: int = 0  # general (symbolic-shape) compiles after de-duplicating identical pieces
    static_compiles: int = 0  # extra compiles for compile_sizes
    compile_sizes: list[int] = field(default_factory=list)
    noops_removed: int = 0
    pattern_matches: dict[str, int] = field(default_factory=dict)  # fusion pass -> replacements
    dynamo_s: float = 0.0  # Dynamo tracing
    passes_s: float = 0.0  # kiln's FX passes and split (fusion passes run inside Inductor, counted there)
    inductor_s: float = 0.0  # compiles that missed the cache
    cache_load_s: float = 0.0  # compiles served from the cache
    warmup_run_s: float = 0.0  # the rest: running the dummy batches (first launches, kernel autotuning)
    total_s: float = 0.0  # whole start-up compile, warm-up runs included
    cache_dir: str | None = None
    cache_key: str | None = None
    cache_status: str = "disabled"  # hit / partial / miss / disabled
    dynamo_graph: str = ""  # reuse_dynamo_graph: "loaded" (no trace), "traced and saved", "traced (...)"
    cache_reason: str = ""  # one line: "hit: entry <key>", "miss: compile_sizes changed [1] -> []", ...
    cache_hits: int = 0  # compiles served from the cache (AOT-autograd or FX-graph cache)
    cache_misses: int = 0
    attention_backend: str = ""  # torch / triton
    cuda_graphs: str = ""  # what was captured, or "off (why)"
    graph_capture_s: float = 0.0
    graph_memory_bytes: int = 0  # what the KV budget left for the graphs
    graph_memory_source: str = "none"  # "recorded" (an earlier start), "trial capture" or "none"
    kv_profile_source: str = "none"  # activation peak: "recorded" (an earlier start), "measured" or "none"
    # start-up phase by phase (kiln/runtime/startup_timeline.py): phases_s, llm_s, ready_s
    timeline: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        graphs = f"; attention {self.attention_backend or '?'}, CUDA graphs {self.cuda_graphs or 'off'}"
        if self.graph_capture_s:
            graphs += (
                f" captured in {self.graph_capture_s:.1f}s, {self.graph_memory_bytes / 2**20:.0f} MiB "
                f"budgeted ({self.graph_memory_source}), activation peak {self.kv_profile_source}"
            )
        startup = ""
        if self.timeline.get("phases_s"):
            phases = ", ".join(f"{k} {v:.2f}" for k, v in self.timeline["phases_s"].items())
            startup = f"; start-up (s): {phases}"
        return self._compile_summary() + graphs + startup

    def _compile_summary(self) -> str:
        if self.mode == "none":
            return "compilation off (eager forward)"
        matches = ", ".join(f"{k}={v}" for k, v in self.pattern_matches.items()) or "none"
        return (
            f"compiled ({self.mode}/{self.backend}) in {self.total_s:.1f}s: {self.graphs_captured} graph(s), "
            f"{self.pieces} pieces + {self.splitting_pieces} split ops, "
            f"{self.unique_compiles} unique compiles + {self.static_compiles} static {self.compile_sizes}; "
            f"dynamo {self.dynamo_s:.2f}s, passes {self.passes_s:.2f}s, inductor {self.inductor_s:.2f}s, "
            f"cache load {self.cache_load_s:.2f}s, warm-up runs {self.warmup_run_s:.2f}s; "
            + (f"dynamo graph {self.dynamo_graph}; " if self.dynamo_graph else "")
            + f"cache {self.cache_status} ({self.cache_hits} hit, {self.cache_misses} miss; "
            f"{self.cache_reason}); "
            f"noops removed {self.noops_removed}; fusions: {matches}; recompilations {self.recompilations}"
        )

    def __str__(self) -> str:
        return self.summary()
