"""Engine settings resolved from ``LLM(...)`` arguments and the model's config."""

from dataclasses import dataclass, field

import torch

from kiln.compiler.config import CompilationConfig, CompilationPlan
from kiln.ops.attention_backend import attention_backend_class

CPU_DEFAULT_KV_CACHE_BYTES = 512 * 1024**2  # KV cache size on CPU when kv_cache_memory_bytes is not given

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype, config_dtype: str | None, device: torch.device) -> torch.dtype:
    """``"auto"``: the checkpoint's dtype on GPU (float32 becomes float16), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype: unsupported {dtype}; use float32, float16 or bfloat16")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        resolved = _DTYPES.get(str(config_dtype).replace("torch.", ""), torch.float16)
        return torch.float16 if resolved == torch.float32 else resolved
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unsupported value {dtype!r}; use 'auto', {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class EngineConfig:
    """The resolved engine settings, fixed for the engine's life (``dataclasses.replace`` derives a new
    one, e.g. when the KV cache lowers ``max_model_len``). ``plan`` is derived from the rest."""

    model_path: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    max_model_len_explicit: bool
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.92
    kv_cache_memory_bytes: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    attention_backend: str = "torch"
    load_format: str = "auto"
    compilation_config: CompilationConfig | None = None
    tensor_parallel_size: int = 1  # ranks; the worker processes are kiln/distributed/executor.py's
    distributed_executor_backend: str = "mp"  # how ranks beyond 0 run: "mp" processes or "ray" actors
    data_parallel_size: int = 1  # engine replicas (kiln/distributed/data_parallel.py)
    pooling: object = None  # kiln.pooling.spec.PoolingModelSpec with runner="pooling"
    quantization: object = None  # kiln.quant.QuantConfig or None
    kv_cache_dtype: str = "auto"  # "auto" (model dtype) | "fp8" | "fp8_e4m3"
    async_scheduling: bool = True  # launch step N+1 before reading step N's tokens back
    max_logprobs: int = 20  # most logprobs / prompt_logprobs a request may ask for; -1: the vocabulary
    logprobs_mode: str = "raw_logprobs"  # raw_logprobs | raw_logits | processed_logprobs | processed_logits
    scheduling_policy: str = "fcfs"  # fcfs | priority
    enable_chunked_prefill: bool = True  # False: a prompt is computed in one step or waits
    lora: object = None  # kiln.lora.config.LoRAConfig with enable_lora=True
    structured_outputs_config: object = None  # kiln.structured.StructuredOutputsConfig
    stream_interval: int = 1  # AsyncLLM: a stream's output every this many tokens (first and last at once)
    plan: CompilationPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        cc = self.compilation_config
        if not isinstance(cc, CompilationConfig):
            cc = CompilationConfig.parse(cc)
            object.__setattr__(self, "compilation_config", cc)
        plan = cc.resolve(
            self.device.type,
            self.enforce_eager,
            attention_backend_class(self.attention_backend).supports_cuda_graphs,
            self.max_num_seqs,
            self.max_num_batched_tokens,
            self.attention_backend,
        )
        object.__setattr__(self, "plan", plan)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)
