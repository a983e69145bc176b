"""The engine: requests, the scheduler, the step loop and outputs. The device side is the worker's.

Start-up (``LLMEngine.__init__``) drives the worker through its order: load the model, compile and
warm up, measure, size and allocate the KV cache, capture graphs. Each ``step()`` hands the worker a
plain-data ``SchedulerOutput`` and gets a ``RunnerOutput`` back; the output processor accepts its
tokens once they are read back.
"""

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import replace

import torch

from kiln.distributed.executor import make_worker
from kiln.lora.request import LoRARequest
from kiln.models.config import ModelConfig
from kiln.pooling.finish import PooledOutputs
from kiln.pooling.state import PoolingState
from kiln.runtime.config import EngineConfig
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.output_processor import OutputProcessor, Request
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence
from kiln.runtime.step_data import RunnerOutput
from kiln.structured.manager import StructuredOutputManager
from kiln.structured.params import StructuredOutputsConfig

logger = logging.getLogger("kiln")


def _apply_to_model(func, worker):
    return func(worker.model)


_POOLING_PARAMS = SamplingParams(max_tokens=1)  # what a prompt-only sequence's sampling fields read


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer, worker=None):
        """``worker``: anything with the worker's serving interface (tests pass a fake one); by default
        a ``Worker`` (one per rank under tensor parallelism, ``kiln/distributed/executor.py``), brought
        up here."""
        self.model_config, self.tokenizer = model_config, tokenizer
        if worker is None:
            worker = make_worker(config, model_config)
            worker.load_model()
            worker.compile_and_warm_up()
            num_blocks = self._num_kv_blocks(worker.determine_kv_budget(), worker.kv_bytes_per_block())
            config = self._fit_max_model_len(config, num_blocks)
            worker.initialize_kv_cache(num_blocks, config)
            worker.capture_graphs()
        self.config, self.worker = config, worker
        self.num_blocks = worker.num_blocks
        self.kv = KVCacheManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.lora = getattr(worker, "lora", None)  # kiln.lora.manager.LoRAManager with enable_lora
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.max_model_len,
            config.scheduling_policy,
            config.enable_chunked_prefill,
            lora=self.lora,
        )
        self.async_scheduling = config.async_scheduling
        self.pending: RunnerOutput | None = None  # launched step whose tokens are not read back yet
        # called once (then cleared) by the next step that launches work, before it waits for the
        # device: what another thread may do meanwhile then overlaps the device's work
        self.before_device_wait: Callable[[], None] | None = None
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_ids = {eos} if eos is not None else set(model_config.eos_token_id)
        self.processor = OutputProcessor(tokenizer, eos_ids, config.max_model_len)
        self.seqs: dict[int, Sequence] = {}  # unfinished sequences by id
        self.pooled = PooledOutputs()  # pooling requests and their outputs on the way to the host
        self._next_seq_id = 0
        self.profiler = None  # EngineProfiler (kiln/runtime/profiler.py) when LLM(profiler_config=...)

    @property
    def stats(self):
        """MetricsCollector (kiln/runtime/metrics.py) when LLM(disable_log_stats=False); the output
        processor reports each accepted token to it."""
        return self.processor.stats

    def get_tokenizer(self):
        return self.tokenizer

    @stats.setter
    def stats(self, collector) -> None:
        self.processor.stats = collector

    @functools.cached_property
    def structured(self) -> StructuredOutputManager:
        """Grammars of structured-output requests, made on the first such request."""
        return StructuredOutputManager(
            self.config.structured_outputs_config or StructuredOutputsConfig(),
            self.tokenizer,
            self.model_config.vocab_size,
            sorted(self.processor.eos_token_ids),
            self.config.device,
        )

    @staticmethod
    def _num_kv_blocks(budget: int, block_bytes: int) -> int:
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {block_bytes} bytes")
        return num_blocks

    @staticmethod
    def _fit_max_model_len(config: EngineConfig, num_blocks: int) -> EngineConfig:
        fits = num_blocks * config.block_size
        if config.max_model_len <= fits:
            return config
        if config.max_model_len_explicit:
            raise ValueError(
                f"max_model_len: {config.max_model_len} tokens do not fit in the KV cache "
                f"({num_blocks} blocks = {fits} tokens); lower it or give the cache more memory"
            )
        logger.warning("max_model_len lowered from %d to %d to fit the KV cache", config.max_model_len, fits)
        return replace(config, max_model_len=fits)

    # ------------------------------------------------------------------ views of the worker

    @property
    def model(self):
        return self.worker.model

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        return self.worker.kv_caches

    @property
    def runner(self):
        return self.worker.runner

    @property
    def graph_capture_seconds(self) -> float:
        return self.worker.graph_capture_seconds

    @property
    def eos_token_ids(self) -> set[int]:
        return self.processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:
        self.processor.eos_token_ids = ids

    # ------------------------------------------------------------------ requests

    def load_lora(self, lora_request: LoRARequest):
        """Read and check an adapter (cached after the first time); ValueError naming it otherwise."""
        if self.lora is None:
            raise ValueError(
                f"lora_request {lora_request.lora_name!r}: LoRA is off; build the LLM with enable_lora=True"
            )
        return self.lora.load(lora_request)

    def validate_params(self, params: SamplingParams) -> None:
        """Checks that need the tokenizer or the grammar backend, run before any request of a call is
        added (after ``InputProcessor.check_params``): bad_words encoded and inside the vocabulary,
        structured outputs parsed (compiling starts)."""
        vocab = self.model_config.vocab_size
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words need a tokenizer (skip_tokenizer_init=True)")
            params.update_from_tokenizer(self.tokenizer)
            bad = [t for ids in params.bad_words_token_ids for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"bad_words: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if params.structured_outputs is not None:
            self.structured.validate(params)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> list[Sequence]:
        """Add a request of ``params.n`` sequences; returns them."""
        self._check_awake()
        if request_id in self.processor.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        adapter = None if lora_request is None else self.load_lora(lora_request)
        max_tokens = self.config.max_model_len - len(prompt_token_ids)
        if params.bad_words and not params.bad_words_token_ids:
            params.update_from_tokenizer(self.tokenizer)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        seqs = []
        for i in range(params.n):
            seq = Sequence(
                self._next_seq_id,
                request_id,
                i,
                list(prompt_token_ids),
                params,
                max_tokens,
                cache_salt=cache_salt,
                priority=priority,
            )
            seq.lora, seq.lora_request = adapter, lora_request
            if params.structured_outputs is not None:
                seq.grammar = self.structured.new_state(params)
            self._next_seq_id += 1
            seqs.append(seq)
        self.processor.add_request(Request(request_id, prompt, list(prompt_token_ids), seqs, lora_request))
        for seq in seqs:
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        return seqs

    # beams (kiln/runtime/beam_search.py): sequences held after each sample, forked in place

    def fork_sequence(self, parent: Sequence, token: int) -> Sequence:
        """A new sequence of ``parent``'s request: its tokens with ``token`` instead of the last
        (read back, not computed yet), sharing its KV blocks (the scheduler's ``fork``)."""
        if parent.params.detokenize or parent.grammar is not None:
            raise ValueError("only sequences without detokenization or grammar can be forked")
        parent.check_last_token_uncomputed()
        child = parent.fork(self._next_seq_id)
        self._next_seq_id += 1
        child.choose_last_token(token)
        self.processor.add_sequence(child)
        self.seqs[child.seq_id] = child
        self.scheduler.fork(parent, child)
        return child

    def continue_sequence(self, seq: Sequence, token: int) -> None:
        """A held beam goes on with ``token`` as its last token (read back, not computed yet)."""
        seq.choose_last_token(token)
        self.scheduler.release(seq)

    def drop_sequence(self, seq: Sequence) -> None:
        """End one unfinished sequence without an output (a beam not chosen); its blocks are freed."""
        self.processor.drop_sequence(seq)
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)

    def add_pooling_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], state: PoolingState
    ) -> None:
        """A prompt-only request: prefilled, pooled (``state``), finished; never decoded."""
        self._check_awake()
        seq = Sequence(self._next_seq_id, request_id, 0, list(prompt_token_ids), _POOLING_PARAMS, 0)
        seq.pooling = state
        self._next_seq_id += 1
        self.pooled.add_request(request_id, list(prompt_token_ids))
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    def abort_all(self) -> None:
        """Drop every request and free its KV blocks (the launched step, if any, is discarded)."""
        if self.pending is not None and self.pending.ready is not None:
            self.pending.ready.synchronize()
        self.pending = None
        aborted = self.scheduler.abort_all()
        self.processor.abort_all()
        self.pooled.clear()
        self.seqs.clear()
        if self.stats is not None:
            self.stats.on_abort(aborted, self.scheduler, self.kv)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop one request and free its KV blocks; its output (unfinished samples with finish reason
        ``"abort"``), or None if it is not running. A launched step's tokens for it are discarded."""
        request = self.processor.abort_request(request_id)
        if request is None:
            return None
        aborted = [seq for seq in request.seqs if self.seqs.pop(seq.seq_id, None) is not None]
        for seq in aborted:
            self.scheduler.finish(seq)
        if self.stats is not None:
            self.stats.on_abort(aborted, self.scheduler, self.kv)
        return request.output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.pooled.has_pending()

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step (profiled and counted when enabled); return the requests finished in it."""
        self._check_awake()
        with self.profiler.step() if self.profiler is not None else contextlib.nullcontext():
            finished = self._step()
        if self.stats is not None:
            self.stats.on_step(self.scheduler, self.kv)
        return finished

    def _step(self) -> list[RequestOutput]:
        """One scheduling step.

        Steps overlap: step N+1 is launched (its last input tokens taken from step N's device output)
        before step N's tokens are read back, so the host work of one step hides behind the device
        work of the next. While a request needs its tokens on the host to sample (penalties,
        logprobs), every step is read back before the next is scheduled. Stops are therefore seen one
        step late in overlap; the extra token is dropped.

        A step with constrained (structured-output) rows keeps the overlap: its forward is launched
        first, then the previous step is read back (its tokens advance the grammar matchers), then the
        grammar's token mask is filled on the host and the step's sampler launched with it.
        """
        finished: list[RequestOutput] = []
        sync = not self.async_scheduling or self.scheduler.num_needing_host_tokens > 0
        if self.pending is not None and sync:
            finished += self._process(self.pending)
            self.pending = None
        out = self.scheduler.schedule_step()
        if not out:
            finished += self.pooled.drain()
            if self.pending is not None:  # nothing to launch: read the last step back
                finished += self._process(self.pending)
                self.pending = None
            elif self.scheduler.has_unfinished():
                if StructuredOutputManager.wait_for_any(self.scheduler.waiting):  # only grammars compiling
                    return finished
                raise RuntimeError("scheduler produced an empty step while requests are pending")
            return finished
        out.defer_sampling = self.scheduler.num_constrained > 0 and any(
            s.sample and s.params.structured_outputs is not None for s in out.scheduled
        )
        launched = self.worker.execute_model(out)
        hook = self.before_device_wait
        if hook is not None:
            self.before_device_wait = None
            hook()
        finished += self.pooled.finish(self, launched.pooled)  # earlier steps' pooled outputs too
        previous, self.pending = self.pending, launched
        if previous is not None:
            finished += self._process(previous)
        if out.defer_sampling:  # the matchers have seen every earlier token now
            self.worker.sample_deferred(
                self.structured.token_mask([self.seqs.get(i) for i in launched.seq_ids])
            )
        if sync:
            finished += self._process(launched)
            self.pending = None
        # every token below a sequence's computed count is known on the host by now
        self.scheduler.cache_computed_blocks()
        return finished

    def enable_step_deltas(self) -> None:
        """Record from now on what each step adds, for ``step_deltas`` (off by default: a caller that
        reads only finished outputs pays nothing for it). Enable it before adding the requests."""
        self.processor.track_deltas = True

    def step_deltas(self, urgent: bool = False, request_id: str | None = None) -> list[RequestOutput]:
        """What the ``step()`` calls since the last call added to each request (see
        ``OutputProcessor.step_deltas``); needs ``enable_step_deltas()``."""
        return self.processor.step_deltas(urgent, request_id)

    def _process(self, step: RunnerOutput) -> list[RequestOutput]:
        finished_seqs, finished = self.processor.process(step, self.seqs)
        for seq in finished_seqs:
            self.scheduler.finish(seq)
            del self.seqs[seq.seq_id]
        return finished

    # ------------------------------------------------------------------ the worker's control API

    def collective_rpc(
        self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
    ):
        """Run ``method`` (a worker method name, or a callable taking the worker first) on every
        worker (one per tensor-parallel rank); the list of results. ``timeout``: seconds to wait,
        TimeoutError after."""
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if isinstance(method, str):
            fn = getattr(getattr(self.worker, "local", self.worker), method, None)
            if fn is None or not callable(fn) or method.startswith("_"):
                raise ValueError(f"method: the worker has no public method {method!r}")
        elif callable(method):
            worker = self.worker
            fn = lambda *a, **k: method(worker, *a, **k)
        else:
            raise ValueError(
                f"method must be a worker method name or a callable, got {type(method).__name__}"
            )
        kwargs = kwargs or {}
        if getattr(self.worker, "world_size", 1) > 1:
            return self.worker.call_all(method, args, kwargs, timeout)
        if timeout is None:
            return [fn(*args, **kwargs)]
        result: dict = {}

        def run():
            try:
                result["value"] = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller
                result["error"] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"collective_rpc: {method!r} did not finish within {timeout} s")
        if "error" in result:
            raise result["error"]
        return [result["value"]]

    def apply_model(self, func):
        return self.collective_rpc(functools.partial(_apply_to_model, func))  # picklable for other ranks

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """``mode``: what happens to unfinished requests: ``"abort"`` drops them, ``"wait"`` runs them
        to completion first (their outputs are discarded; offline ``generate`` never leaves any)."""
        if mode not in ("abort", "wait", "keep"):
            raise ValueError(f"mode must be 'abort', 'wait' or 'keep', got {mode!r}")
        if mode == "keep":
            raise NotImplementedError("sleep(mode='keep'): kiln aborts or finishes requests before sleeping")
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        while mode == "wait" and self.has_unfinished_requests():
            self.step()
        self.abort_all()
        self.worker.sleep(level)
        self.kv.reset_prefix_cache()  # the cache's contents are gone

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.worker.wake_up(tags)

    def _check_awake(self) -> None:
        if self.worker.asleep:
            raise RuntimeError(
                f"the engine is asleep ({', '.join(sorted(self.worker.asleep))} released by sleep(level="
                f"{self.worker.sleep_level})): call wake_up() before generating"
            )
