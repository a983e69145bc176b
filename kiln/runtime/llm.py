"""``LLM``: vLLM's offline entrypoint on kiln's engine."""

import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.compiler.report import CompileReport
from kiln.distributed.data_parallel import DataParallelReplicas
from kiln.lora.request import per_prompt
from kiln.models.hub import resolve_model_path
from kiln.pooling.api import PoolingMethods
from kiln.runtime.beam_search import BeamSearchOutput, BeamSearchParams, run_beam_search
from kiln.runtime.chat import (
    CONTENT_FORMATS,
    detect_content_format,
    load_chat_template,
    normalise_conversation,
)
from kiln.runtime.engine import LLMEngine
from kiln.runtime.engine_args import EngineArgs
from kiln.runtime.gguf_tokenizer import load_gguf_tokenizer
from kiln.runtime.input_processor import (
    InputProcessor,
    as_prompt_list,
    check_priorities,
    check_tokenization_kwargs,
)
from kiln.runtime.metrics import MetricsCollector
from kiln.runtime.metrics_reader import Metric
from kiln.runtime.model_config_view import ModelConfigView
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.profiler import EngineProfiler, ProfilerConfig
from kiln.runtime.request_queue import RequestQueue, wait_for_queue
from kiln.runtime.sampling_params import SamplingParams

_ALWAYS_CALLABLE = frozenset({"shutdown"})  # public names that still work after shutdown()


def _check_implemented(params: SamplingParams) -> None:
    """SamplingParams fields kiln accepts only at their default value."""
    unsupported = {
        "logits_processors": bool(params.logits_processors),
        "flat_logprobs": params.flat_logprobs,
        "spaces_between_special_tokens": not params.spaces_between_special_tokens,
    }
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise NotImplementedError(
            f"kiln does not implement SamplingParams field(s) {named} at non-default values"
        )


class LLM(PoolingMethods):
    """Generate text from a Llama-family checkpoint with continuous batching over a paged KV cache;
    or, with ``runner="pooling"``, embed, classify, score and reward (``kiln.pooling``).

    Takes vLLM's ``LLM`` arguments: ``chat_template`` (a template or a file holding one) plus every
    ``EngineArgs`` field (``kiln/runtime/engine_args.py``) by keyword.
    """

    def __init__(self, model: str, *, chat_template: str | os.PathLike | None = None, **kwargs: Any) -> None:
        if "swap_space" in kwargs:
            kwargs.pop("swap_space")
            warnings.warn(
                "The 'swap_space' parameter is deprecated and ignored.", DeprecationWarning, stacklevel=2
            )
        kwargs.setdefault("disable_log_stats", True)
        self._start(EngineArgs.from_kwargs("LLM", model=model, **kwargs), chat_template)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, chat_template: str | None = None) -> "LLM":
        """Create an LLM from ``EngineArgs``."""
        llm = cls.__new__(cls)
        llm._start(engine_args, chat_template)
        return llm

    def _start(self, args: EngineArgs, chat_template) -> None:
        started = time.perf_counter()  # the start-up timeline's "config": everything before the engine
        resolved = args.resolve()  # every argument checked before anything is loaded
        chat_template = load_chat_template(chat_template)
        path = resolved.model_path
        self.engine_args = args
        self.pooling_spec = resolved.engine_config.pooling
        self.runner_type = "generate" if self.pooling_spec is None else "pooling"
        self.model_path = path
        cache_root = resolved.engine_config.compilation_config.cache_root()  # GGUF tokenizers converted once
        self.tokenizer = None if args.skip_tokenizer_init else self._load_tokenizer(args, path, cache_root)
        self.chat_template = chat_template
        self.generation_config = resolved.generation_config
        self.config = resolved.engine_config
        self.compilation_config = self.config.compilation_config
        self.model_config = ModelConfigView(
            resolved.model_config,
            lambda: self.__dict__["config"],  # the engine's final config once it exists
            args.model,
            args.tokenizer,
            served_model_name=args.served_model_name,
            revision=args.revision,
        )
        torch.manual_seed(args.seed)
        config_s = time.perf_counter() - started
        self._replicas = DataParallelReplicas.start(args, chat_template)  # None: one replica
        try:
            self.llm_engine = LLMEngine(self.config, self.model_config, self.tokenizer)
            if self._replicas is not None:
                self._replicas.wait_ready()
        except BaseException:
            if self._replicas is not None:
                self._replicas.shutdown()
            raise
        self.config = self.llm_engine.config  # final: the KV cache may have lowered max_model_len
        self._inputs = InputProcessor(self.tokenizer, resolved.model_config.vocab_size, self.config)
        self._queue = RequestQueue()  # enqueue / wait_for_completion
        profiler_config = ProfilerConfig.parse(args.profiler_config)
        self._profiler = EngineProfiler(profiler_config, self.config.device)
        if profiler_config.profiler is not None:
            self.llm_engine.profiler = self._profiler
        if not args.disable_log_stats:
            self.llm_engine.stats = MetricsCollector(args.model, self.config.max_model_len)
        self._request_counter = 0
        self.llm_engine.worker.timeline.finish(started, config_s)  # logs the start-up line

    def __getattribute__(self, name: str):
        if (
            not name.startswith("_")
            and name not in _ALWAYS_CALLABLE
            and object.__getattribute__(self, "__dict__").get("_shut_down")
        ):
            raise RuntimeError(f"LLM.{name}: this LLM has been shut down; create a new LLM to use it again")
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        d = object.__getattribute__(self, "__dict__")
        if "engine_args" not in d:
            return "LLM(<not started>)"
        if d.get("_shut_down"):
            return f"LLM(model={d['engine_args'].model!r}, shut down)"
        cfg, engine = d["config"], d["llm_engine"]
        return (
            f"LLM(model={d['engine_args'].model!r}, architecture={engine.model_config.architecture!r}, "
            f"device={cfg.device.type!r}, dtype={str(cfg.dtype).replace('torch.', '')!r}, "
            f"max_model_len={cfg.max_model_len}, max_num_seqs={cfg.max_num_seqs}, "
            f"kv_cache_blocks={engine.num_blocks}x{cfg.block_size}, "
            f"attention_backend={cfg.attention_backend!r}, enforce_eager={cfg.enforce_eager})"
        )

    # ------------------------------------------------------------------ set-up helpers

    @staticmethod
    def _load_tokenizer(args: EngineArgs, model_path: str, cache_root: str | None = None):
        from transformers import AutoTokenizer

        source = model_path
        if args.tokenizer:
            revision = args.tokenizer_revision or args.revision
            source = resolve_model_path(
                args.tokenizer, revision, cache_dir=args.download_dir, token=args.hf_token
            )
        kwargs = dict(
            trust_remote_code=args.trust_remote_code,
            use_fast=args.tokenizer_mode != "slow",
            local_files_only=True,
        )
        if source.endswith(".gguf"):
            return load_gguf_tokenizer(source, cache_root, **kwargs)
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer: cannot load a tokenizer from {source!r}: {e}") from e

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

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget every cached prefix block; True on success. With ``reset_running_requests`` running
        requests are preempted first (they recompute later); kiln has no KV connector to reset."""
        engine = self.llm_engine
        if reset_running_requests:
            engine.scheduler.preempt_all()
        return engine.kv.reset_prefix_cache()

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

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if mm_processor_kwargs is not None:
            raise NotImplementedError("kiln does not implement generate parameter 'mm_processor_kwargs'")
        self._require_generate("generate")
        return self._run(
            prompts,
            sampling_params,
            use_tqdm,
            check_tokenization_kwargs(tokenization_kwargs),
            priority,
            lora_request,
        )

    def _require_generate(self, method: str) -> None:
        if self.runner_type != "generate":
            raise ValueError(
                f"LLM.{method}() is only supported for generative models; this LLM runs "
                f"{self.llm_engine.model_config.architecture} with runner='pooling'. Load a causal LM "
                "with runner='generate' (or 'auto') to generate, or call embed/classify/score/reward/encode."
            )

    def _run(
        self, prompts, sampling_params, use_tqdm, tokenization_kwargs, priority=None, lora_request=None
    ) -> list[RequestOutput]:
        prepared = self._prepare(prompts, sampling_params, tokenization_kwargs, priority, lora_request)
        if self._replicas is not None:  # data parallelism: kiln/distributed/data_parallel.py
            return self._replicas.generate(self, prepared, use_tqdm)
        return self._run_engine(self._add_requests(prepared), use_tqdm)

    def _prepare(
        self, prompts, sampling_params, tokenization_kwargs, priority=None, lora_request=None
    ) -> list[tuple]:
        """Validate and tokenize every prompt and read every adapter, adding nothing:
        ``(ProcessedPrompt, SamplingParams, priority, LoRARequest | None)`` per prompt."""
        prompts = as_prompt_list(prompts)
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
        priorities = check_priorities(priority, len(prompts), self.config.scheduling_policy)
        prepared = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            if not isinstance(params, SamplingParams):
                raise ValueError(
                    f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}"
                )
            _check_implemented(params)
            self._inputs.check_params(params, i)
            params = params.clone()
            params.update_from_generation_config(
                self.generation_config, getattr(self.tokenizer, "eos_token_id", None)
            )
            self.llm_engine.validate_params(params)  # bad_words, structured_outputs
            prepared.append((self._inputs.process(prompt, i, params, tokenization_kwargs), params))
        loras = per_prompt(lora_request, len(prompts))
        for lora in loras:  # every adapter read and checked before any request is added
            if lora is not None:
                self.llm_engine.load_lora(lora)
        return [(p, params, prio, lora) for (p, params), prio, lora in zip(prepared, priorities, loras)]

    def _add_requests(self, prepared) -> list[str]:
        ids = []
        for processed, params, prio, lora in prepared:
            request_id = str(self._request_counter)
            self._request_counter += 1
            self.llm_engine.add_request(
                request_id, processed.text, processed.token_ids, params, processed.cache_salt, prio, lora
            )
            ids.append(request_id)
        return ids

    def _run_engine(self, ids: list[str], use_tqdm) -> list[RequestOutput]:
        """Step until nothing is unfinished; the outputs of ``ids`` in order. Outputs of queued
        requests (``enqueue``) that finish meanwhile are kept for ``wait_for_completion``."""
        engine = self.llm_engine
        wanted = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            make_bar = use_tqdm if callable(use_tqdm) else tqdm
            bar = make_bar(
                total=len(ids),
                desc="Processed prompts",
                dynamic_ncols=True,
                postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s",
            )
        in_tokens = out_tokens = 0
        start = time.perf_counter()
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.request_id not in wanted:
                        self._queue.finished(output)
                        continue
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
            self._queue.clear()
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
        """Render each conversation with the chat template, then generate.

        ``chat_template_content_format``: ``"string"`` renders text parts joined into one string,
        ``"openai"`` a list of ``{"type": "text", ...}`` parts, ``"auto"`` whichever the template loops over.
        """
        self._require_generate("chat")
        prompts = self._chat_prompts(
            messages,
            chat_template,
            chat_template_content_format,
            add_generation_prompt,
            continue_final_message,
            tools,
            chat_template_kwargs,
            tokenization_kwargs,
            mm_processor_kwargs,
        )
        return self._run(prompts, sampling_params, use_tqdm, {}, lora_request=lora_request)

    def _chat_prompts(
        self,
        messages,
        chat_template,
        chat_template_content_format,
        add_generation_prompt,
        continue_final_message,
        tools,
        chat_template_kwargs,
        tokenization_kwargs,
        mm_processor_kwargs,
    ) -> list[dict]:
        """Each conversation rendered with the chat template, as a prompt with its token ids."""
        if chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(
                "chat_template_content_format must be one of "
                f"{CONTENT_FORMATS}, got {chat_template_content_format!r}"
            )
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be True: "
                "set add_generation_prompt=False to continue the final message"
            )
        if mm_processor_kwargs is not None:
            raise NotImplementedError("kiln does not implement mm_processor_kwargs")
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True)")
        tokenization_kwargs = {"add_special_tokens": False, **check_tokenization_kwargs(tokenization_kwargs)}
        template = load_chat_template(chat_template) or self.chat_template
        content_format = chat_template_content_format
        if content_format == "auto":
            used = template or getattr(self.tokenizer, "chat_template", None)
            content_format = detect_content_format(used if isinstance(used, str) else None)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(
                f"messages must be a non-empty list of messages or of conversations, got {messages!r}"
            )
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for i, conv in enumerate(conversations):
            text = self.tokenizer.apply_chat_template(
                normalise_conversation(conv, content_format, i),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                chat_template=template,
                **(chat_template_kwargs or {}),
            )
            ids = self.tokenizer(text, **tokenization_kwargs)["input_ids"]
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return prompts

    def beam_search(
        self, prompts: Any, params: BeamSearchParams, lora_request: Any = None, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search; all beams of all prompts run in one batch and share their prefixes'
        KV blocks (``kiln/runtime/beam_search.py`` says where the semantics differ from HF's)."""
        self._require_generate("beam_search")
        return run_beam_search(self, prompts, params, lora_request)

    # ------------------------------------------------------------------ queued generation

    def enqueue(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: Any = None,
        priority: list[int] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """Add requests without running them; their ids. ``wait_for_completion()`` runs them. Every
        prompt is validated and tokenized first: a bad one adds nothing."""
        if mm_processor_kwargs is not None:
            raise NotImplementedError("kiln does not implement enqueue parameter 'mm_processor_kwargs'")
        self._require_generate("enqueue")
        tokenization_kwargs = check_tokenization_kwargs(tokenization_kwargs)
        prepared = self._prepare(prompts, sampling_params, tokenization_kwargs, priority, lora_request)
        ids = self._add_requests(prepared)
        self._queue.add(ids)
        return ids

    def enqueue_chat(
        self,
        messages: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., tqdm] = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        """``chat``'s rendering, then ``enqueue``: the request ids; ``wait_for_completion()`` runs them."""
        self._require_generate("enqueue_chat")
        prompts = self._chat_prompts(
            messages,
            chat_template,
            chat_template_content_format,
            add_generation_prompt,
            continue_final_message,
            tools,
            chat_template_kwargs,
            tokenization_kwargs,
            mm_processor_kwargs,
        )
        ids = self._add_requests(self._prepare(prompts, sampling_params, {}, priority, lora_request))
        self._queue.add(ids)
        return ids

    def wait_for_completion(
        self,
        output_type: type | tuple[type, ...] | None = None,
        *,
        use_tqdm: bool | Callable[..., tqdm] = True,
    ) -> list[Any]:
        """Run every queued request to completion; their outputs in the order they were enqueued
        (the queue is empty afterwards). ``output_type``: the type(s) expected (``RequestOutput``)."""
        return wait_for_queue(self, output_type, use_tqdm)

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
        return self._every_replica(
            "collective_rpc", (method, timeout, args, kwargs), self.llm_engine.collective_rpc
        )

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        """``func(model)`` on every worker's model; the list of results."""
        return self._every_replica("apply_model", (func,), self.llm_engine.apply_model)

    def _every_replica(self, method: str, args: tuple, local: Callable, join: bool = True) -> Any:
        """``local(*args)`` here, and ``LLM.<method>(*args)`` on every other data-parallel replica;
        with ``join`` the lists of results joined in replica order."""
        if self._replicas is None:
            return local(*args)
        parts = self._replicas.call(method, args, lambda: local(*args))
        return [x for part in parts for x in part] if join else None

    def get_world_size(self, include_dp: bool = True) -> int:
        """Workers serving this LLM: one per tensor-parallel rank, times the data-parallel replicas
        with ``include_dp``."""
        dp = self.config.data_parallel_size if include_dp else 1
        return self.config.tensor_parallel_size * dp

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Release device memory between uses. Level 1: weights to pinned host memory, the KV cache
        discarded; level 2: weights discarded too (``wake_up`` reloads them from the checkpoint).
        ``mode``: unfinished requests are aborted (``"abort"``) or finished first (``"wait"``).
        Generating raises until ``wake_up``."""
        self._every_replica("sleep", (level, mode), self.llm_engine.sleep, join=False)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore what ``sleep`` released: ``tags`` among ``"weights"``, ``"kv_cache"`` (None: both).
        Once both are back the CUDA graphs are captured again."""
        self._every_replica("wake_up", (tags,), self.llm_engine.wake_up, join=False)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Free the engine (KV cache, model). Every other method raises RuntimeError afterwards."""
        replicas = self.__dict__.get("_replicas")
        if replicas is not None:
            replicas.shutdown()
        engine = self.__dict__.get("llm_engine")
        if engine is not None:
            self._profiler.shutdown()
            engine.abort_all()
            engine.worker.shutdown()
            structured = engine.__dict__.get("structured")  # made on the first constrained request
            if structured is not None:
                structured.shutdown()
            self.llm_engine = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._shut_down = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
