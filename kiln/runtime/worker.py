"""The worker: the one owner of the device side of an engine.

It holds the model, the KV-cache tensors, the compiled forward, the CUDA graphs, the attention backend
with its buffers and the sampler's device state (generators), and brings them up in this order:

1. ``load_model``: weights onto the device;
2. ``compile_and_warm_up``: trace and compile the forward, then run the real (compiled) forward over
   dummy steps that launch every attention-kernel variant, and the sampler's kernels;
3. ``determine_kv_budget``: the peak memory of the compiled forward at the largest batch and the
   memory of graph capture (both recorded with the compile artifacts by an earlier start with the same
   key and shapes, ``kv_profile.py``, else measured now: a forward at the largest batch, a trial
   capture), subtracted from what ``gpu_memory_utilization`` allows;
4. ``initialize_kv_cache``: the KV cache from what is left;
5. ``capture_graphs``: full and piecewise CUDA graphs over the real cache;
6. ``execute_model``: serve steps (``SchedulerOutput`` in, ``RunnerOutput`` out), each after the KV
   block copies it asks for (``copy_blocks``).

``sleep``/``wake_up`` release and restore the weights and the KV cache; ``LLM.collective_rpc`` calls
methods of this object.
"""

import contextlib
import logging
import time

import torch
from tqdm.auto import tqdm

from kiln.compiler.compiled_forward import compile_forward
from kiln.compiler.config import CompilationMode
from kiln.compiler.cudagraph import CudaGraphs
from kiln.compiler.imports import import_compiler
from kiln.compiler.report import CompileReport
from kiln.distributed import parallel_state
from kiln.distributed.sharding import checkpoint_slice, rank_model_config
from kiln.lora.manager import lora_manager_for
from kiln.models.config import ModelConfig
from kiln.models.loader import build_model, load_weights
from kiln.ops.attention_backend import attention_backend_class
from kiln.ops.forward_context import forward_context
from kiln.ops.sample_argmax import sample_argmax
from kiln.quant.kv_cache import configure_kv_cache
from kiln.runtime.block_copy import copy_blocks
from kiln.runtime.config import CPU_DEFAULT_KV_CACHE_BYTES, EngineConfig
from kiln.runtime.kv_profile import measurement_name, recorded_or_measured
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.startup_timeline import StartupTimeline
from kiln.runtime.step_data import RunnerOutput, SchedulerOutput
from kiln.structured.token_mask import TokenMask, bitmask_words

logger = logging.getLogger("kiln")

SLEEP_TAGS = ("weights", "kv_cache")


class Worker:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        """``model_config``: the model's (or a view of it); under tensor parallelism ``self.model_config``
        holds this rank's shapes (its heads, KV heads and intermediate size)."""
        self.tp = parallel_state.get() if config.tensor_parallel_size > 1 else parallel_state.ONE_RANK
        self.config = config
        self.full_model_config = getattr(model_config, "arch", model_config)  # the architecture config
        self.model_config = rank_model_config(self.full_model_config, self.tp.size)
        self.device = config.device
        self.plan = config.plan
        self.attention = attention_backend_class(config.attention_backend)(config.block_size, config.device)
        self.graphs = CudaGraphs(self.plan.full_graph_sizes, self.plan.piecewise_graph_sizes)
        self.model = None
        self.lora = None  # kiln.lora.manager.LoRAManager with enable_lora
        self.compiled = None  # kiln.compiler.compiled_forward.CompiledForward, None when eager
        self.runner: ModelRunner | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.phases: list[str] = []  # start-up steps, in the order they ran
        self.timeline = StartupTimeline()  # seconds per start-up phase
        self.graph_memory_bytes = 0  # memory graph capture takes (what the KV budget left for it)
        self.graph_memory_source = "none"  # "recorded" (earlier start), "trial capture", "none"
        self.kv_profile_source = "none"  # activation peak: "recorded" (earlier start), "measured", "none"
        self.graph_capture_seconds = 0.0
        self.sleep_level = 0
        self.asleep: set[str] = set()  # released parts: "weights", "kv_cache"
        self._host_weights: dict[str, torch.Tensor] = {}
        self._storage_bytes: dict[str, int] = {}  # parameter name -> bytes of its released storage

    # ------------------------------------------------------------------ start-up

    def load_model(self) -> None:
        self.phases.append("load_model")
        with self.timeline.phase("weight_load"):
            self._load_model()

    def _load_model(self) -> None:
        cfg = self.config
        self.model = build_model(
            cfg.model_path,
            self.model_config,
            cfg.dtype,
            cfg.device,
            cfg.load_format,
            pooling=cfg.pooling,
            quant=cfg.quantization,
            shard=self._shard(),
            tp=self.tp,
        )
        self.kv_cache_dtype = configure_kv_cache(self.model, cfg.kv_cache_dtype, cfg.dtype)
        self.lora = lora_manager_for(cfg, self.model_config, self.model)  # wraps the (fp8) projections

    def _shard(self):
        """This rank's slice of each checkpoint tensor (None with one rank)."""
        if self.tp.size == 1:
            return None
        mc, rank, size = self.full_model_config, self.tp.rank, self.tp.size
        return lambda name: checkpoint_slice(name, mc, rank, size)

    def compile_and_warm_up(self) -> None:
        cfg, mc = self.config, self.model_config
        self.phases.append("compile")
        if self.plan.mode != CompilationMode.NONE:
            with self.timeline.phase("compiler_import"):
                import_compiler()
        self.compiled = compile_forward(self.model, mc, cfg, self.attention, self.graphs)
        if self.compiled is not None:
            report = self.compiled.report
            for phase in ("dynamo", "passes", "inductor", "cache_load"):
                self.timeline.add(phase, getattr(report, f"{phase}_s"))
            self.timeline.add("triton_warmup", report.warmup_run_s)  # first launches of the dummy batches
        forward = self.compiled or self.model.forward
        self.runner = ModelRunner(
            self.model,
            self.graphs.wrap(forward, "full"),
            self.attention,
            self.graphs,
            cfg.device,
            seed=cfg.seed,
            one_row_logits=self.plan.one_row_logits and self.tp.size == 1,
            logprobs_mode=cfg.logprobs_mode,
            lora=self.lora,
        )
        if self.graphs.full_sizes:
            self.attention.allocate_graph_buffers(self.graphs.full_sizes[-1], cfg.max_blocks_per_seq)
        self.phases.append("warm_up")
        with self.timeline.phase("triton_warmup"), self._kernel_cache():
            self._warm_up()
        logger.info(
            "kiln: attention backend %s (CUDA graphs supported: %s); CUDA graphs %s",
            self.attention.name,
            "yes" if self.attention.supports_cuda_graphs else "no",
            self.plan.describe_graphs(),
        )

    def _scratch_kv(self) -> list[torch.Tensor]:
        """A one-block cache per layer: enough for dummy steps that store nothing."""
        mc, cfg = self.model_config, self.config
        shape = (2, 1, cfg.block_size, mc.num_kv_heads, mc.head_dim)
        return [torch.zeros(shape, dtype=self.kv_cache_dtype, device=cfg.device)] * mc.num_layers

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile before the first request what would otherwise compile during it: the real forward
        over dummy steps that launch every attention-kernel variant, and on CUDA the one-row logits
        and the sampler's kernels (greedy and sampled, model dtype and fp32 logits, with and without a
        grammar's mask)."""
        mc, dev = self.model_config, self.device
        scratch = self._scratch_kv()
        steps = self.attention.warmup_steps(mc.num_heads, mc.num_kv_heads, mc.head_dim, self.config.dtype)
        for md in steps:
            zeros = torch.zeros(md.slot_mapping.shape[0], dtype=torch.long, device=dev)
            with forward_context(md, scratch, self.attention):
                self.runner.forward(zeros, zeros)
        if dev.type != "cuda":
            return
        weight = self.model.logits_weight()
        logits = self.runner.logits(torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=dev))
        # and each under a grammar's mask (structured outputs), which the kernel reads beside the logits
        words = bitmask_words(logits.shape[1])
        allow_all = TokenMask(torch.full((1, words), -1, dtype=torch.int32, device=dev), None)
        for x in (logits, logits.float()):
            for mask in (None, allow_all):
                sample_argmax(x, token_mask=mask)
                sample_argmax(x, torch.ones(1, device=dev), torch.ones(x.shape, device=dev), mask)

    def kv_bytes_per_block(self) -> int:
        mc, cfg = self.model_config, self.config
        elem = torch.tensor([], dtype=self.kv_cache_dtype).element_size()
        return 2 * mc.num_layers * cfg.block_size * mc.num_kv_heads * mc.head_dim * elem

    def determine_kv_budget(self) -> int:
        """Bytes the KV cache may take: ``kv_cache_memory_bytes`` when given, 512 MiB on CPU, else
        what ``gpu_memory_utilization`` leaves after this process's tensors, the compiled forward's
        peak at the largest batch and the CUDA graphs."""
        cfg = self.config
        self.phases.append("profile")
        if cfg.kv_cache_memory_bytes is not None:
            return cfg.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_CACHE_BYTES
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        other = total - free - torch.cuda.memory_reserved()  # other processes and the CUDA context
        in_use = torch.cuda.memory_allocated()  # weights, buffers and anything else this process holds
        with self.timeline.phase("kv_profile"):
            activations, self.kv_profile_source = recorded_or_measured(
                self._cache(), self._activation_name(), lambda: self._forward_peak() - in_use
            )
        # the trial capture's warm-up runs reuse the blocks the peak run left cached: only graph memory
        # shows in its measurement
        graphs = self.graph_memory_bytes = self._graph_memory() if self.graphs.enabled else 0
        torch.cuda.empty_cache()
        budget = int(total * cfg.gpu_memory_utilization - other - in_use - activations - graphs)
        if budget <= 0:
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            gib = 2**30
            parts = {
                "weights": weights,
                "other tensors of this process (e.g. another LLM)": in_use - weights,
                "activations": activations,
                "CUDA graphs": graphs,
                "other processes": other,
            }
            taken = ", ".join(f"{name} {size / gib:.2f}" for name, size in parts.items())
            raise ValueError(
                f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves no memory for the KV cache: of "
                f"{total / gib:.2f} GiB, {taken} GiB are taken; pass kv_cache_memory_bytes or free the memory"
            )
        return budget

    @torch.inference_mode()
    def _forward_peak(self) -> int:
        """Peak allocated bytes of the real forward over the largest batch, logits and sampling
        probabilities of ``max_num_seqs`` rows included."""
        cfg = self.config
        n = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        scratch = self._scratch_kv()
        md = self.attention.dummy(n)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with forward_context(md, scratch, self.attention):
            hidden = self.runner.forward(ids, torch.arange(n, device=self.device))
            self.runner.logits(hidden[: cfg.max_num_seqs]).float().softmax(-1)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def _cache(self):
        return self.compiled.cache if self.compiled is not None else None

    def _kernel_cache(self):
        """Triton's cache pointed into the compile cache entry while kernels are first launched (warm-up,
        capture), so an entry filled by ``kiln compile`` holds the attention and sampler kernels too."""
        cache = self._cache()
        return cache.activate() if cache is not None else contextlib.nullcontext()

    def _activation_name(self) -> str:
        cfg = self.config
        spec = {
            "tokens": min(cfg.max_num_batched_tokens, cfg.max_model_len),
            "logit_rows": cfg.max_num_seqs,
            "attention": self.attention.name,
            "block_size": cfg.block_size,
            "kv_cache_dtype": str(self.kv_cache_dtype),
        }
        return measurement_name("activation_peak_bytes", spec)

    def _graph_memory_key(self) -> str:
        cfg = self.config
        spec = {
            "full": self.graphs.full_sizes,
            "piecewise": self.graphs.piecewise_sizes,
            "max_blocks_per_seq": cfg.max_blocks_per_seq,
            "block_size": cfg.block_size,
            "attention": self.attention.name,
        }
        return measurement_name("cuda_graph_bytes", spec)

    def _graph_memory(self) -> int:
        """Device memory the graphs take: recorded by an earlier start with this compile key, or
        measured now by capturing every graph over a scratch cache and releasing them."""
        cache = self.compiled.cache if self.compiled is not None else None
        recorded = cache.measurement(self._graph_memory_key()) if cache is not None else None
        if recorded is not None:
            self.graph_memory_source = "recorded"
            return int(recorded)
        # capture into fresh memory: with the forward peak's blocks still cached the measurement can
        # miss the pool; the capture's own warm-up runs are counted too (small next to the peak)
        torch.cuda.empty_cache()
        with self.timeline.phase("graph_capture"), self._kernel_cache():
            used = self._measured_capture(self._scratch_kv(), None)
        self.graphs.reset()
        torch.cuda.synchronize()
        self.graph_memory_source = "trial capture"
        return used

    def initialize_kv_cache(self, num_blocks: int, config: EngineConfig | None = None) -> None:
        """Allocate the KV cache (``config``: the engine's config once it is final, e.g. a lowered
        ``max_model_len``)."""
        if config is not None and config != self.config:
            if config.max_blocks_per_seq != self.config.max_blocks_per_seq and self.graphs.full_sizes:
                self.attention.allocate_graph_buffers(self.graphs.full_sizes[-1], config.max_blocks_per_seq)
            self.config = config
        self.phases.append("allocate_kv_cache")
        self.num_blocks = num_blocks
        mc, cfg = self.model_config, self.config
        shape = (2, num_blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim)
        with self.timeline.phase("kv_allocate"):
            self.kv_caches = [
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=cfg.device) for _ in range(mc.num_layers)
            ]
        self.runner.kv_caches = self.kv_caches

    def capture_graphs(self) -> None:
        if not self.graphs.enabled:
            return
        self.phases.append("capture_graphs")
        start = time.perf_counter()
        with self._kernel_cache():
            used = self._measured_capture(self.kv_caches, "Capturing CUDA graphs")
        self.graphs.ready = True
        self.graph_capture_seconds = time.perf_counter() - start
        self.timeline.add("graph_capture", self.graph_capture_seconds)
        if used > self.graph_memory_bytes and self.graph_memory_source != "none":
            logger.warning(
                "CUDA graphs took %.1f MiB, %.1f MiB more than the KV budget left for them (%s)",
                used / 2**20,
                (used - self.graph_memory_bytes) / 2**20,
                self.graph_memory_source,
            )
        if self.compiled is not None:
            self.compiled.cache.record_measurement(
                self._graph_memory_key(), max(used, self.graph_memory_bytes)
            )
        logger.info(
            "kiln: captured CUDA graphs in %.1fs, %.1f MiB (budgeted from %s)",
            self.graph_capture_seconds,
            used / 2**20,
            self.graph_memory_source,
        )

    @torch.inference_mode()
    def _measured_capture(self, kv_caches: list[torch.Tensor], desc: str | None) -> int:
        """Capture every graph over ``kv_caches``, largest first (smaller graphs reuse the pool's
        memory); returns the device memory it took (the pool and the driver's graph objects)."""
        graphs, runner = self.graphs, self.runner
        torch.cuda.synchronize()
        free_before, reserved_before = torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()
        total = len(graphs.full_sizes) + len(graphs.piecewise_sizes)
        with tqdm(total=total, desc=desc, dynamic_ncols=True, disable=desc is None) as bar:
            for size in reversed(graphs.piecewise_sizes):
                md = self.attention.dummy(size)
                with forward_context(md, kv_caches, self.attention, "piecewise", size, capturing=True):
                    runner.forward(runner.input_ids[:size], runner.positions[:size])
                bar.update(1)
            for size in reversed(graphs.full_sizes):
                md = self.attention.graph_metadata(None, size)
                with forward_context(md, kv_caches, self.attention, "full", size, capturing=True):
                    runner.forward(runner.input_ids[:size], runner.positions[:size])
                bar.update(1)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up runs' blocks; the graphs' stay in their pool
        driver = free_before - torch.cuda.mem_get_info()[0]  # the pool's segments and the graph objects
        pool = torch.cuda.memory_reserved() - reserved_before  # the pool's segments alone
        logger.info(
            "kiln: graph capture took %.1f MiB of device memory, %.1f MiB of it in the pool",
            driver / 2**20,
            pool / 2**20,
        )
        return max(0, driver, pool)

    # ------------------------------------------------------------------ serving

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        if self.asleep:
            raise RuntimeError(f"the worker is asleep ({sorted(self.asleep)} released): call wake_up() first")
        copy_blocks(self.kv_caches, scheduler_output.copy_blocks)  # forked beams' partial blocks
        if "first_token" in self.timeline.seconds:
            return self.runner.execute(scheduler_output)
        with self.timeline.phase("first_token"):  # the first step, to its tokens on the device
            out = self.runner.execute(scheduler_output)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return out

    def sample_deferred(self, grammar_bitmask) -> None:
        """Sample the step just launched with ``defer_sampling`` (a ``GrammarBitmask`` or None)."""
        self.runner.sample_deferred(grammar_bitmask)

    def compile_report(self) -> CompileReport:
        report = self.compiled.report if self.compiled is not None else CompileReport()
        report.attention_backend = self.attention.name
        report.cuda_graphs = self.plan.describe_graphs()
        report.graph_capture_s = self.graph_capture_seconds
        report.graph_memory_bytes = self.graph_memory_bytes
        report.graph_memory_source = self.graph_memory_source
        report.kv_profile_source = self.kv_profile_source
        report.timeline = self.timeline.to_dict()
        return report

    def shutdown(self) -> None:
        """Release the graphs and the KV cache now (the rest goes with the object)."""
        self.graphs.reset()
        self.kv_caches.clear()
        if self.runner is not None:
            self.runner.previous = None

    # ------------------------------------------------------------------ sleep / wake-up

    def _weights(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())  # a tied weight appears once

    def sleep(self, level: int = 1) -> None:
        """Level 1: weights to (pinned) host memory, KV cache discarded; level 2: both discarded.
        The tensors keep their identity (compiled code stays valid); the graphs are dropped and
        recaptured on wake-up, as the memory comes back at other addresses."""
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        if self.asleep:
            raise RuntimeError(f"already asleep (level {self.sleep_level}); call wake_up() first")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        self.graphs.reset()
        self.runner.previous = None
        pin = self.device.type == "cuda"
        with torch.no_grad():
            for name, p in self._weights().items():
                if level == 1:  # the whole storage: a stacked LoRA weight keeps the A table past p
                    whole = _storage_bytes_view(p)
                    host = torch.empty(whole.shape, dtype=torch.uint8, pin_memory=pin)
                    host.copy_(whole)
                    self._host_weights[name] = host
                self._storage_bytes[name] = p.data.untyped_storage().nbytes()
                p.data.untyped_storage().resize_(0)
            for t in self.kv_caches:  # whole tensors: their size is their storage's
                t.untyped_storage().resize_(0)
        self.sleep_level = level
        self.asleep = set(SLEEP_TAGS)
        sync()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore the released parts (``tags`` from ``"weights"``, ``"kv_cache"``; None: all); once
        both are back the CUDA graphs are captured again."""
        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        bad = [t for t in tags if t not in SLEEP_TAGS]
        if bad:
            raise ValueError(f"tags must be among {SLEEP_TAGS}, got {bad}")
        if not self.asleep:
            return
        with torch.no_grad():
            if "weights" in tags and "weights" in self.asleep:
                weights = self._weights()
                for name, p in weights.items():
                    p.data.untyped_storage().resize_(self._storage_bytes.pop(name))
                if self.sleep_level == 1:
                    for name, p in weights.items():
                        _storage_bytes_view(p).copy_(self._host_weights.pop(name))
                else:
                    cfg = self.config
                    load_weights(
                        self.model,
                        cfg.model_path,
                        self.model_config,
                        cfg.load_format,
                        cfg.quantization,
                        shard=self._shard(),
                    )
                    if self.lora is not None:  # the A tables shared the weights' storage
                        self.lora.forget_slots()
                self.asleep.discard("weights")
            if "kv_cache" in tags and "kv_cache" in self.asleep:
                for t in self.kv_caches:
                    t.untyped_storage().resize_(t.numel() * t.element_size())
                    t.zero_()
                self.asleep.discard("kv_cache")
        if not self.asleep:
            self.sleep_level = 0
            if self.graphs.enabled:
                self.capture_graphs()


def _storage_bytes_view(p: torch.Tensor) -> torch.Tensor:
    """uint8 over the whole storage behind ``p`` (more than ``p`` where it is a view, as a LoRA-stacked
    weight is)."""
    storage = p.data.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=p.device).set_(storage, 0, (storage.nbytes(),), (1,))
