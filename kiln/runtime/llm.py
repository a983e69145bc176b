"""``LLM``: vLLM's offline entrypoint on kiln's engine."""

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln import envs
from kiln.compiler.config import CompilationConfig
from kiln.compiler.report import CompileReport
from kiln.distributed.sharding import check_tensor_parallel
from kiln.models.config import ModelConfig
from kiln.models.loader import read_config, resolve_model_path
from kiln.runtime.config import EngineConfig, resolve_dtype
from kiln.runtime.engine import LLMEngine
from kiln.runtime.inputs import parse_prompt
from kiln.runtime.metrics import MetricsCollector
from kiln.runtime.metrics_reader import Metric
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.profiler import EngineProfiler, ProfilerConfig
from kiln.runtime.sampling_params import SamplingParams

# LLM(...) parameters kiln accepts only at their default value: (name, default)
_UNSUPPORTED = {
    "runner": "auto",
    "convert": "auto",
    "allowed_local_media_path": "",
    "allowed_media_domains": None,
    "quantization": None,
    "tokenizer_revision": None,
    "cpu_offload_gb": 0,
    "offload_group_size": 0,
    "offload_num_in_group": 1,
    "offload_prefetch_step": 1,
    "offload_params": None,
    "enable_return_routed_experts": False,
    "disable_custom_all_reduce": False,
    "hf_token": None,
    "hf_overrides": None,
    "mm_processor_kwargs": None,
    "pooler_config": None,
    "structured_outputs_config": None,
    "quantization_config": None,
    "logits_processors": None,
    "spec_method": None,
    "spec_model": None,
    "spec_tokens": None,
}
# engine arguments accepted through **kwargs
_ENGINE_KWARGS = {
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "enable_prefix_caching",
    "load_format",
    "disable_log_stats",
    "enable_chunked_prefill",
    "profiler_config",
    "distributed_executor_backend",
}
_ATTENTION_BACKENDS = ("torch", "triton")


def _check_positive(name: str, value, allow_none=True):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_implemented(params: SamplingParams) -> None:
    """SamplingParams fields kiln accepts only at their default value."""
    unsupported = {
        "bad_words": bool(params.bad_words),
        "logits_processors": bool(params.logits_processors),
        "structured_outputs": params.structured_outputs is not None,
        "flat_logprobs": params.flat_logprobs,
        "spaces_between_special_tokens": not params.spaces_between_special_tokens,
    }
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise NotImplementedError(
            f"kiln does not implement SamplingParams field(s) {named} at non-default values"
        )


class LLM:
    """Generate text from a Llama-family checkpoint with continuous batching over a paged KV cache."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str | torch.dtype = "auto",
        revision: str | None = None,
        chat_template: str | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        enforce_eager: bool = False,
        attention_config: dict | None = None,
        kv_cache_memory_bytes: int | None = None,
        compilation_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if "swap_space" in kwargs:
            kwargs.pop("swap_space")
            warnings.warn(
                "The 'swap_space' parameter is deprecated and ignored.", DeprecationWarning, stacklevel=2
            )
        for name, default in _UNSUPPORTED.items():
            if kwargs.get(name, default) != default:
                raise NotImplementedError(
                    f"kiln does not implement LLM parameter {name!r} (got {kwargs[name]!r})"
                )
            kwargs.pop(name, None)
        unknown = set(kwargs) - _ENGINE_KWARGS
        if unknown:
            raise NotImplementedError(f"kiln does not implement LLM parameter(s) {sorted(unknown)}")
        if tokenizer_mode not in ("auto", "slow", "hf"):
            raise ValueError(f"tokenizer_mode must be 'auto', 'slow' or 'hf', got {tokenizer_mode!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if kwargs.get("enable_chunked_prefill") is False:
            raise NotImplementedError("enable_chunked_prefill=False: kiln always chunks long prefills")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            _check_positive(name, kwargs.get(name))
        _check_positive("kv_cache_memory_bytes", kv_cache_memory_bytes)
        compilation_config = CompilationConfig.parse(compilation_config)  # InvalidCompilationConfig
        if kwargs.get("load_format", "auto") not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(
                f"load_format must be 'auto', 'safetensors', 'gguf' or 'dummy', got {kwargs['load_format']!r}"
            )

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        profiler_config = ProfilerConfig.parse(kwargs.get("profiler_config"))
        profiler_config.check_device(device)
        if not isinstance(kwargs.get("disable_log_stats", True), bool):
            raise ValueError(f"disable_log_stats must be a bool, got {kwargs['disable_log_stats']!r}")
        log_stats = not kwargs.get("disable_log_stats", True)
        default_backend = envs.attention_backend() or ("triton" if device.type == "cuda" else "torch")
        backend = (attention_config or {}).get("backend") or default_backend
        if backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_config backend must be one of {_ATTENTION_BACKENDS}, got {backend!r}"
            )
        if set(attention_config or {}) - {"backend"}:
            raise ValueError(f"attention_config: unknown keys {sorted(set(attention_config) - {'backend'})}")

        path = resolve_model_path(model, revision)
        model_config = ModelConfig.from_dict(read_config(path))
        backend_name = kwargs.get("distributed_executor_backend")
        check_tensor_parallel(model_config, tensor_parallel_size, backend_name, device)
        self.model_path = path
        self.tokenizer = (
            None
            if skip_tokenizer_init
            else self._load_tokenizer(tokenizer, path, tokenizer_mode, trust_remote_code, revision)
        )
        self.chat_template = chat_template
        self.generation_config = self._read_generation_config(path)
        max_len = kwargs.get("max_model_len")
        if max_len is not None and max_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's max_position_embeddings "
                f"({model_config.max_position_embeddings})"
            )
        self.compilation_config = compilation_config
        self.config = EngineConfig(
            model_path=path,
            device=device,
            dtype=resolve_dtype(dtype, model_config.torch_dtype, device),
            max_model_len=max_len or model_config.max_position_embeddings,
            max_model_len_explicit=max_len is not None,
            max_num_seqs=kwargs.get("max_num_seqs") or 256,
            max_num_batched_tokens=kwargs.get("max_num_batched_tokens") or 8192,
            block_size=kwargs.get("block_size") or 16,
            enable_prefix_caching=kwargs.get("enable_prefix_caching", True),
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            seed=seed,
            enforce_eager=enforce_eager,
            attention_backend=backend,
            load_format="dummy" if kwargs.get("load_format") == "dummy" else "auto",
            compilation_config=compilation_config,
            tensor_parallel_size=tensor_parallel_size,
        )
        torch.manual_seed(seed)
        self.llm_engine = LLMEngine(self.config, model_config, self.tokenizer)
        self.config = self.llm_engine.config  # final: the KV cache may have lowered max_model_len
        self._profiler = EngineProfiler(profiler_config, device)
        if profiler_config.profiler is not None:
            self.llm_engine.profiler = self._profiler
        if log_stats:
            self.llm_engine.stats = MetricsCollector(model, self.config.max_model_len)
        self._request_counter = 0

    # ------------------------------------------------------------------ set-up helpers

    @staticmethod
    def _load_tokenizer(tokenizer, model_path, mode, trust_remote_code, revision):
        from transformers import AutoTokenizer

        source = tokenizer or model_path
        kwargs = dict(trust_remote_code=trust_remote_code, use_fast=mode != "slow", local_files_only=True)
        if source.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(
                os.path.dirname(source) or ".", gguf_file=os.path.basename(source), **kwargs
            )
        try:
            return AutoTokenizer.from_pretrained(source, revision=revision, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer: cannot load a tokenizer from {source!r}: {e}") from e

    @staticmethod
    def _read_generation_config(path: str) -> dict:
        file = os.path.join(path, "generation_config.json")
        if os.path.isdir(path) and os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
        return {}

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's behaviour)."""
        keys = {
            "temperature": "temperature",
            "top_p": "top_p",
            "top_k": "top_k",
            "min_p": "min_p",
            "repetition_penalty": "repetition_penalty",
            "max_new_tokens": "max_tokens",
        }
        found = {ours: self.generation_config[k] for k, ours in keys.items() if k in self.generation_config}
        return SamplingParams(**found) if found else SamplingParams()

    def compile_report(self) -> CompileReport:
        """What start-up compilation did: graphs, pieces, unique compiles, fusion matches, time per
        stage, cache hits and recompilations (mode "none" when the forward runs eagerly)."""
        return self.llm_engine.worker.compile_report()

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.kv.reset_prefix_cache()

    # ------------------------------------------------------------------ observability

    def start_profile(self, profile_prefix: str | None = None) -> None:
        """Profile the engine steps from now until ``stop_profile()``; the trace file names start with
        ``profile_prefix`` (see ``kiln/runtime/profiler.py``). Needs ``LLM(profiler_config=...)``."""
        self._profiler.start(profile_prefix)

    def stop_profile(self) -> None:
        """Stop profiling and write the trace into ``profiler_config.torch_profiler_dir``."""
        self._profiler.stop()

    def get_metrics(self) -> list[Metric]:
        """A snapshot of the engine's metrics (vLLM's names and ``Counter`` / ``Gauge`` / ``Histogram``
        objects, ``kiln/runtime/metrics_reader.py``). Needs ``LLM(disable_log_stats=False)``."""
        stats = self.llm_engine.stats
        if stats is None:
            raise RuntimeError(
                "get_metrics(): statistics are off (the default); create the LLM with disable_log_stats=False"
            )
        return stats.snapshot()

    # ------------------------------------------------------------------ generation

    def _to_token_ids(
        self, prompt: Any, index: int, params: SamplingParams, add_special_tokens: bool
    ) -> tuple[str | None, list[int]]:
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = {"prompt_token_ids": prompt}
        parsed = parse_prompt(prompt)
        if "prompt_token_ids" in parsed:
            text, ids = parsed.get("prompt"), list(parsed["prompt_token_ids"])
        else:
            text = parsed["prompt"]
            if self.tokenizer is None:
                raise ValueError(f"prompt {index}: text prompts need a tokenizer (skip_tokenizer_init=True)")
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        vocab = self.llm_engine.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {index}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        trunc = params.truncate_prompt_tokens
        if trunc is not None:
            ids = ids[-(self.config.max_model_len if trunc == -1 else trunc) :]
        max_len = self.config.max_model_len
        if len(ids) > max_len:  # vLLM's two messages: longer than the context, or leaving no output room
            raise ValueError(
                f"prompt {index}: the decoder prompt (length {len(ids)}) is longer than the maximum model "
                f"length of {max_len}"
            )
        if len(ids) == max_len:
            raise ValueError(
                f"prompt {index}: the decoder prompt (length {len(ids)}) plus the number of requested output "
                f"tokens (at least 1) is longer than the maximum model length of {max_len}"
            )
        return text, ids

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        for name, value in (("lora_request", lora_request), ("mm_processor_kwargs", mm_processor_kwargs)):
            if value is not None:
                raise NotImplementedError(f"kiln does not implement generate parameter {name!r}")
        add_special_tokens = (tokenization_kwargs or {}).get("add_special_tokens", True)
        return self._run(prompts, sampling_params, use_tqdm, add_special_tokens, priority)

    def _run(
        self, prompts, sampling_params, use_tqdm, add_special_tokens, priority=None
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: the list of prompts is empty")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params: got {len(params_list)} for {len(prompts)} prompts; "
                    "pass one, or one per prompt"
                )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority: got {len(priority)} values for {len(prompts)} prompts")
        if priority is not None and any(priority):
            raise ValueError(
                f"priority: kiln schedules first-come first-served; got priorities {priority[:8]}"
            )
        # validate and tokenize everything before anything runs, so a bad prompt rejects the call cleanly
        prepared = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            if not isinstance(params, SamplingParams):
                raise ValueError(
                    f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}"
                )
            _check_implemented(params)
            if params.logprobs is not None and params.logprobs > self.llm_engine.model_config.vocab_size:
                raise ValueError(f"logprobs={params.logprobs} exceeds the vocabulary size")
            params = params.clone()
            params.update_from_generation_config(
                self.generation_config, getattr(self.tokenizer, "eos_token_id", None)
            )
            prepared.append((*self._to_token_ids(prompt, i, params, add_special_tokens), params))
        engine = self.llm_engine
        ids = []
        for text, token_ids, params in prepared:
            request_id = str(self._request_counter)
            self._request_counter += 1
            engine.add_request(request_id, text, token_ids, params)
            ids.append(request_id)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            make_bar = use_tqdm if callable(use_tqdm) else tqdm
            bar = make_bar(
                total=len(prompts),
                desc="Processed prompts",
                dynamic_ncols=True,
                postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s",
            )
        in_tokens = out_tokens = 0
        start = time.perf_counter()
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    results[output.request_id] = output
                    if bar is not None:
                        in_tokens += len(output.prompt_token_ids)
                        out_tokens += sum(len(o.token_ids) for o in output.outputs)
                        elapsed = time.perf_counter() - start
                        bar.postfix = (
                            f"est. speed input: {in_tokens / elapsed:.2f} toks/s, "
                            f"output: {out_tokens / elapsed:.2f} toks/s"
                        )
                        bar.update(1)
        except BaseException:
            engine.abort_all()  # an interrupted call leaves nothing behind for the next one
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    def chat(
        self,
        messages: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template, then generate."""
        if chat_template_content_format not in ("auto", "string"):
            raise NotImplementedError(
                f"chat_template_content_format={chat_template_content_format!r}: "
                "kiln renders string message contents only"
            )
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be True: "
                "set add_generation_prompt=False to continue the final message"
            )
        if lora_request is not None or mm_processor_kwargs is not None:
            raise NotImplementedError("kiln does not implement lora_request or mm_processor_kwargs")
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                chat_template=chat_template or self.chat_template,
                **(chat_template_kwargs or {}),
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self._run(prompts, sampling_params, use_tqdm, add_special_tokens=False)

    # ------------------------------------------------------------------ the worker

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Run a worker method (by name) or ``method(worker, *args, **kwargs)`` on every worker; the
        list of their results. ``timeout``: seconds to wait before ``TimeoutError`` (None: no limit)."""
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        """``func(model)`` on every worker's model; the list of results."""
        return self.llm_engine.apply_model(func)

    def get_world_size(self, include_dp: bool = True) -> int:
        """Workers serving this LLM (tensor x pipeline parallel, times data parallel with
        ``include_dp``)."""
        return self.config.tensor_parallel_size

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Release device memory between uses. Level 1: weights to pinned host memory, the KV cache
        discarded; level 2: weights discarded too (``wake_up`` reloads them from the checkpoint).
        ``mode``: unfinished requests are aborted (``"abort"``) or finished first (``"wait"``).
        Generating raises until ``wake_up``."""
        self.llm_engine.sleep(level, mode)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what ``sleep`` released: ``tags`` among ``"weights"``, ``"kv_cache"`` (None: both).
        Once both are back the CUDA graphs are captured again."""
        self.llm_engine.wake_up(tags)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            self._profiler.shutdown()
            engine.worker.shutdown()
            self.llm_engine = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
