"""``EngineArgs``: every ``LLM(...)`` argument under vLLM's name and default, checked and resolved once.

``LLM(**kwargs)`` builds an ``EngineArgs``; ``EngineArgs.from_kwargs`` turns a misspelled name into a
``TypeError`` that suggests the closest valid one. ``check()`` sorts the rest into three kinds:

* honoured: kiln implements them; bad values raise ``ValueError`` naming the field and the value;
* harmless: accepted with any value and without effect on a single-device offline engine (``HARMLESS``);
* the rest are vLLM features kiln does not have: accepted at their default (or a value with the
  same meaning, ``_EQUIVALENT``), any other value raises ``NotImplementedError`` naming the field.

``resolve()`` then reads the checkpoint's config and returns the frozen ``EngineConfig`` plus what the
entrypoint needs (``ResolvedArgs``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from kiln import envs
from kiln.compiler.config import CompilationConfig
from kiln.distributed.sharding import (
    check_data_parallel_features,
    check_executor_backend,
    check_tensor_parallel,
    check_tensor_parallel_features,
)
from kiln.lora.config import LoRAConfig
from kiln.models.config import ModelConfig
from kiln.models.hub import resolve_model_path
from kiln.models.loader import read_config
from kiln.pooling.spec import resolve_runner
from kiln.quant.config import resolve_quantization
from kiln.quant.kv_cache import check_kv_cache_dtype
from kiln.runtime.config import EngineConfig, resolve_dtype
from kiln.runtime.profiler import ProfilerConfig
from kiln.structured.params import StructuredOutputsConfig

LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
SCHEDULING_POLICIES = ("fcfs", "priority")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
TOKENIZER_MODES = ("auto", "slow", "hf")
ATTENTION_BACKENDS = ("torch", "triton")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256
# on a GPU of at least LARGE_GPU_BYTES: more rows a step for the same per-step host cost (H200, 1000 x
# 256/256: llama-1b 133-135k -> 147-149k total tok/s, llama-8b 29.2k -> 31.6k; benchmarks/README.md)
LARGE_GPU_BYTES = 70 * 2**30
LARGE_GPU_MAX_NUM_BATCHED_TOKENS = 16384
LARGE_GPU_MAX_NUM_SEQS = 1024
DEFAULT_BLOCK_SIZE = 16


@dataclass
class EngineArgs:
    """vLLM's engine arguments (``vllm.EngineArgs``): names and defaults as there."""

    model: str = "Qwen/Qwen3-0.6B"
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    hf_config_path: str | None = None
    runner: str = "auto"
    convert: str = "auto"
    skip_tokenizer_init: bool = False
    enable_prompt_embeds: bool = False
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    allowed_local_media_path: str = ""
    allowed_media_domains: list[str] | None = None
    download_dir: str | None = None
    safetensors_load_strategy: str = "lazy"
    load_format: str = "auto"
    config_format: str = "auto"
    dtype: str | torch.dtype = "auto"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    cudagraph_capture_sizes: list[int] | None = None
    distributed_executor_backend: str | None = None
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    enable_expert_parallel: bool = False
    max_parallel_loading_workers: int | None = None
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    prefix_caching_hash_algo: str = "sha256"
    disable_sliding_window: bool = False
    disable_cascade_attn: bool = False
    cpu_offload_gb: float = 0
    offload_group_size: int = 0
    offload_num_in_group: int = 1
    offload_prefetch_step: int = 1
    offload_params: set[str] | None = None
    gpu_memory_utilization: float = 0.92
    kv_cache_memory_bytes: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0
    max_num_seqs: int | None = None
    max_logprobs: int = 20
    logprobs_mode: str = "raw_logprobs"
    disable_log_stats: bool = False
    aggregate_engine_logging: bool = False
    revision: str | None = None
    code_revision: str | None = None
    hf_token: bool | str | None = None
    hf_overrides: dict[str, Any] | Callable | None = None
    tokenizer_revision: str | None = None
    quantization: str | None = None
    quantization_config: Any = None
    enforce_eager: bool = False
    disable_custom_all_reduce: bool = False
    limit_mm_per_prompt: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    fully_sharded_loras: bool = False
    max_cpu_loras: int | None = None
    lora_dtype: str | torch.dtype | None = "auto"
    num_gpu_blocks_override: int | None = None
    model_loader_extra_config: dict[str, Any] | None = None
    ignore_patterns: str | list[str] | None = None
    enable_chunked_prefill: bool | None = None
    disable_chunked_mm_input: bool = False
    disable_hybrid_kv_cache_manager: bool = False
    structured_outputs_config: Any = None
    reasoning_parser: str = ""
    speculative_config: dict[str, Any] | None = None
    spec_method: str | None = None
    spec_model: str | None = None
    spec_tokens: int | None = None
    show_hidden_metrics_for_version: str | None = None
    otlp_traces_endpoint: str | None = None
    collect_detailed_traces: list[str] | None = None
    scheduling_policy: str = "fcfs"
    scheduler_cls: Any = None
    pooler_config: Any = None
    compilation_config: Any = None
    attention_config: Any = None
    profiler_config: Any = None
    worker_cls: str = "auto"
    worker_extension_cls: str = ""
    kv_transfer_config: Any = None
    kv_events_config: Any = None
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None
    enable_sleep_mode: bool = False
    model_impl: str = "auto"
    override_attention_dtype: str | None = None
    calculate_kv_scales: bool = False
    additional_config: dict[str, Any] | None = None
    use_tqdm_on_load: bool = True
    pt_load_map_location: str | dict[str, str] = "cpu"
    logits_processors: list[Any] | None = None
    async_scheduling: bool | None = None
    stream_interval: int = 1
    kv_sharing_fast_prefill: bool = False
    enable_return_routed_experts: bool = False
    renderer_num_workers: int = 1

    @classmethod
    def from_kwargs(cls, owner: str = "EngineArgs", **kwargs: Any) -> EngineArgs:
        """Build from keyword arguments; an unknown name is a ``TypeError`` naming the closest valid one."""
        names = [f.name for f in fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}{hint}")
        return cls(**kwargs)

    def non_default(self) -> dict[str, Any]:
        """The fields set to something other than their default."""
        out = {}
        for f in fields(self):
            default = f.default if f.default is not dataclasses.MISSING else None
            value = getattr(self, f.name)
            if not _same(value, default):
                out[f.name] = value
        return out

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Refuse what kiln cannot honour (``NotImplementedError``) and bad values (``ValueError``)."""
        check_executor_backend(
            self.distributed_executor_backend, self.tensor_parallel_size, self.data_parallel_size
        )
        for name, value in self.non_default().items():
            if name in HONOURED or name in HARMLESS:
                continue
            if any(_same(value, ok) for ok in _EQUIVALENT.get(name, ())):
                continue
            reason = _REASONS.get(name, "kiln does not implement it")
            raise NotImplementedError(f"LLM parameter {name}={value!r} is not supported: {reason}")
        LoRAConfig.from_args(self.enable_lora, self.max_loras, self.max_lora_rank, self.max_cpu_loras)
        StructuredOutputsConfig.parse(self.structured_outputs_config)
        _check_choice("tokenizer_mode", self.tokenizer_mode, TOKENIZER_MODES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("logprobs_mode", self.logprobs_mode, LOGPROBS_MODES)
        _check_choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            _check_positive(name, getattr(self, name))
        _check_positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        for name in (
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "stream_interval",
        ):
            _check_positive(name, getattr(self, name), allow_none=False)
            if (
                name == "pipeline_parallel_size" and self.pipeline_parallel_size != 1
            ):  # TP, DP: kiln/distributed/
                raise NotImplementedError(f"{name}={getattr(self, name)}: kiln runs on one device")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not _is_int(self.max_logprobs) or self.max_logprobs < -1:
            raise ValueError(
                f"max_logprobs must be a non-negative int or -1 (whole vocabulary), got {self.max_logprobs!r}"
            )
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "async_scheduling"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        if not (
            self.hf_overrides is None or isinstance(self.hf_overrides, dict) or callable(self.hf_overrides)
        ):
            raise ValueError(f"hf_overrides must be a dict or a callable, got {self.hf_overrides!r}")
        if not isinstance(self.generation_config, str):
            raise ValueError(
                f"generation_config must be 'auto', 'vllm' or a directory, got {self.generation_config!r}"
            )
        if self.generation_config not in ("auto", "vllm") and not os.path.isdir(self.generation_config):
            raise ValueError(
                f"generation_config: {self.generation_config!r} is not 'auto', 'vllm' "
                "or an existing directory"
            )
        if self.override_generation_config is not None and not isinstance(
            self.override_generation_config, dict
        ):
            raise ValueError(
                f"override_generation_config must be a dict, got {self.override_generation_config!r}"
            )
        if not isinstance(self.disable_log_stats, bool):
            raise ValueError(f"disable_log_stats must be a bool, got {self.disable_log_stats!r}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ProfilerConfig.parse(self.profiler_config).check_device(device)  # ValueError naming the key
        self.attention_backend()  # validates attention_config
        CompilationConfig.parse(self.compilation_config)  # InvalidCompilationConfig names the key
        if self.enable_chunked_prefill is False and self.max_num_batched_tokens is not None:
            if self.max_model_len is not None and self.max_num_batched_tokens < self.max_model_len:
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                    f"({self.max_model_len}) with enable_chunked_prefill=False: longer prompts could never "
                    "run; raise max_num_batched_tokens, lower max_model_len or enable chunked prefill"
                )

    def attention_backend(self) -> str:
        cfg = self.attention_config
        if cfg is not None and not isinstance(cfg, dict):
            cfg = {"backend": getattr(cfg, "backend", None)}
        cfg = cfg or {}
        if set(cfg) - {"backend"}:
            raise ValueError(f"attention_config: unknown keys {sorted(set(cfg) - {'backend'})}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        default = envs.attention_backend() or ("triton" if device == "cuda" else "torch")
        backend = cfg.get("backend") or default
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_config backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        return backend

    # ------------------------------------------------------------------ resolution

    def resolve(self) -> ResolvedArgs:
        """Check, find the checkpoint (downloading it when needed) and build the engine config."""
        self.check()
        path = resolve_model_path(self.model, self.revision, cache_dir=self.download_dir, token=self.hf_token)
        compilation_config = CompilationConfig.parse(self.compilation_config)
        hf_config = apply_hf_overrides(read_config(path, compilation_config.cache_root()), self.hf_overrides)
        model_config = ModelConfig.from_dict(hf_config)
        max_len = self.max_model_len
        if max_len is not None and max_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's max_position_embeddings "
                f"({model_config.max_position_embeddings})"
            )
        max_len = max_len or model_config.max_position_embeddings
        chunked = self.enable_chunked_prefill is not False
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        default_seqs, default_batched = default_batch_limits(device)
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = default_batched if chunked else max(max_len, default_batched)
        elif not chunked and batched < max_len:
            raise ValueError(
                f"max_num_batched_tokens ({batched}) is smaller than max_model_len ({max_len}) with "
                "enable_chunked_prefill=False: longer prompts could never run"
            )
        kv_cache_dtype = check_kv_cache_dtype(self.kv_cache_dtype, device)
        quant = resolve_quantization(self.quantization, self.quantization_config, hf_config, device)
        pooling = resolve_runner(
            model_config.architecture, model_config.raw, self.runner, self.convert, self.pooler_config
        )
        lora = LoRAConfig.from_args(self.enable_lora, self.max_loras, self.max_lora_rank, self.max_cpu_loras)
        check_tensor_parallel_features(self.tensor_parallel_size, quant, pooling, lora)
        check_data_parallel_features(self.data_parallel_size, pooling)
        check_tensor_parallel(  # the model's numbers, then the devices
            model_config,
            self.tensor_parallel_size,
            self.distributed_executor_backend,
            device,
            self.data_parallel_size,
        )
        engine_config = EngineConfig(
            quantization=quant,
            kv_cache_dtype=kv_cache_dtype,
            model_path=path,
            device=device,
            dtype=resolve_dtype(self.dtype, model_config.torch_dtype, device),
            max_model_len=max_len,
            max_model_len_explicit=self.max_model_len is not None,
            max_num_seqs=self.max_num_seqs or default_seqs,
            max_num_batched_tokens=batched,
            block_size=self.block_size or DEFAULT_BLOCK_SIZE,
            enable_prefix_caching=self.enable_prefix_caching is not False,
            gpu_memory_utilization=float(self.gpu_memory_utilization),
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            attention_backend=self.attention_backend(),
            load_format="dummy" if self.load_format == "dummy" else "auto",
            compilation_config=compilation_config,
            async_scheduling=self.async_scheduling is not False,
            max_logprobs=self.max_logprobs,
            logprobs_mode=self.logprobs_mode,
            scheduling_policy=self.scheduling_policy,
            enable_chunked_prefill=chunked,
            tensor_parallel_size=self.tensor_parallel_size,
            distributed_executor_backend="ray" if self.distributed_executor_backend == "ray" else "mp",
            data_parallel_size=self.data_parallel_size,
            structured_outputs_config=StructuredOutputsConfig.parse(self.structured_outputs_config),
            pooling=pooling,
            lora=lora,
            stream_interval=self.stream_interval,
        )
        generation_config = read_generation_config(
            path, self.generation_config, self.override_generation_config
        )
        return ResolvedArgs(path, model_config, engine_config, generation_config)


@dataclass(frozen=True)
class ResolvedArgs:
    """What ``EngineArgs.resolve`` found: the checkpoint, its configs and the engine config."""

    model_path: str
    model_config: ModelConfig  # its ``raw`` is the HF config after ``hf_overrides``
    engine_config: EngineConfig
    generation_config: dict = field(default_factory=dict)


# fields kiln implements (checked in EngineArgs.check, used in resolve or by the entrypoint)
HONOURED = frozenset(
    {
        "model",
        "served_model_name",
        "quantization",
        "quantization_config",
        "kv_cache_dtype",
        "tokenizer",
        "skip_tokenizer_init",
        "tokenizer_mode",
        "trust_remote_code",
        "download_dir",
        "load_format",
        "dtype",
        "seed",
        "max_model_len",
        "block_size",
        "enable_prefix_caching",
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "max_num_batched_tokens",
        "max_num_seqs",
        "max_logprobs",
        "logprobs_mode",
        "revision",
        "hf_token",
        "hf_overrides",
        "tokenizer_revision",
        "enforce_eager",
        "enable_chunked_prefill",
        "scheduling_policy",
        "compilation_config",
        "attention_config",
        "generation_config",
        "override_generation_config",
        "async_scheduling",
        "disable_log_stats",
        "profiler_config",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "runner",
        "convert",
        "pooler_config",
        "structured_outputs_config",
        "enable_lora",
        "max_loras",
        "max_lora_rank",
        "max_cpu_loras",
        "stream_interval",
    }
)

# fields accepted with any value: they change nothing on one device in one process
HARMLESS = frozenset(
    {
        "aggregate_engine_logging",
        "use_tqdm_on_load",
        "max_parallel_loading_workers",
        "disable_custom_all_reduce",
        "disable_cascade_attn",
        "disable_hybrid_kv_cache_manager",
        "disable_chunked_mm_input",
        "prefix_caching_hash_algo",
        "safetensors_load_strategy",
        "pt_load_map_location",
        "renderer_num_workers",
        "show_hidden_metrics_for_version",
    }
)

# values other than the default that mean the same thing in kiln
_EQUIVALENT: dict[str, tuple] = {
    "distributed_executor_backend": ("uni", "mp", "ray"),
    "offload_params": (set(), frozenset()),
    "limit_mm_per_prompt": ({},),
    "model_loader_extra_config": ({},),
    "additional_config": ({},),
    "lora_dtype": (None,),
    "model_impl": ("vllm",),
    "config_format": ("hf",),
}

_REASONS = {
    "speculative_config": "kiln has no speculative decoding",
    "spec_method": "kiln has no speculative decoding",
    "spec_model": "kiln has no speculative decoding",
    "spec_tokens": "kiln has no speculative decoding",
    "mm_processor_kwargs": "kiln has no multimodal models",
    "limit_mm_per_prompt": "kiln has no multimodal models",
    "allowed_local_media_path": "kiln has no multimodal models",
    "allowed_media_domains": "kiln has no multimodal models",
    "distributed_executor_backend": "kiln runs ranks as processes or Ray actors (None, 'uni', 'mp', 'ray')",
    "cpu_offload_gb": "kiln keeps every weight on the device",
    "offload_group_size": "kiln keeps every weight on the device",
    "offload_num_in_group": "kiln keeps every weight on the device",
    "offload_prefetch_step": "kiln keeps every weight on the device",
    "offload_params": "kiln keeps every weight on the device",
}


def default_batch_limits(device: torch.device) -> tuple[int, int]:
    """``(max_num_seqs, max_num_batched_tokens)`` where the user gives none: 1024 and 16384 on a GPU of
    at least 70 GiB, 256 and 8192 elsewhere (smaller GPUs, CPU)."""
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= LARGE_GPU_BYTES:
        return LARGE_GPU_MAX_NUM_SEQS, LARGE_GPU_MAX_NUM_BATCHED_TOKENS
    return DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_NUM_BATCHED_TOKENS


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_hf_overrides(config: dict, overrides: dict | Callable | None) -> dict:
    """vLLM's ``hf_overrides``: a dict merged into the HF config, or a callable that edits it.

    The callable gets a ``transformers.PretrainedConfig`` and returns it (edited or replaced).
    """
    if not overrides:
        return config
    if isinstance(overrides, dict):
        return _merge(config, overrides)
    from transformers import PretrainedConfig

    hf = PretrainedConfig.from_dict(dict(config))
    result = overrides(hf)
    hf = hf if result is None else result
    if not isinstance(hf, PretrainedConfig):
        raise ValueError(
            f"hf_overrides: the callable must return a PretrainedConfig, got {type(hf).__name__}"
        )
    return hf.to_dict()


def read_generation_config(path: str, source: str, overrides: dict | None) -> dict:
    """vLLM's ``generation_config``: ``"auto"`` reads the model's generation_config.json, ``"vllm"``
    ignores it, a directory reads the one there; ``override_generation_config`` is merged on top."""
    folder = path if source == "auto" else None if source == "vllm" else source
    found: dict = {}
    if folder is not None and os.path.isdir(folder):
        file = os.path.join(folder, "generation_config.json")
        if os.path.isfile(file):
            with open(file) as f:
                found = json.load(f)
    return {**found, **(overrides or {})}
