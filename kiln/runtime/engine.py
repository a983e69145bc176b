"""The engine loop: schedule a step, run the model, append tokens, detokenize, check stops, emit outputs."""

import logging
import time

import torch
from tqdm.auto import tqdm

from kiln.compiler.compiled_forward import compile_forward
from kiln.compiler.config import CompilationConfig, CompilationMode
from kiln.compiler.cudagraph import DecodeGraphs, PiecewiseGraphs, default_capture_sizes
from kiln.models.config import ModelConfig
from kiln.models.loader import build_model
from kiln.ops.forward_context import forward_context
from kiln.ops.metadata import AttentionMetadata
from kiln.runtime.config import CPU_DEFAULT_KV_CACHE_BYTES, EngineConfig
from kiln.runtime.detokenizer import IncrementalDetokenizer, find_stop_string
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.model_runner import PLACEHOLDER, ModelRunner, StepOutput
from kiln.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence, Status
from kiln.structured.manager import StructuredOutputManager
from kiln.structured.params import StructuredOutputsConfig

logger = logging.getLogger("kiln")


class Request:
    def __init__(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], seqs: list[Sequence]
    ):
        self.request_id, self.prompt, self.prompt_token_ids, self.seqs = (
            request_id,
            prompt,
            prompt_token_ids,
            seqs,
        )
        self.arrival_time = time.time()
        self.finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer):
        self.config, self.model_config, self.tokenizer = config, model_config, tokenizer
        self.model = build_model(
            config.model_path, model_config, config.dtype, config.device, config.load_format
        )
        num_blocks = self._num_kv_blocks()
        if config.max_model_len > num_blocks * config.block_size:
            fits = num_blocks * config.block_size
            if config.max_model_len_explicit:
                raise ValueError(
                    f"max_model_len: {config.max_model_len} tokens do not fit in the KV cache "
                    f"({num_blocks} blocks = {fits} tokens); lower it or give the cache more memory"
                )
            logger.warning(
                "max_model_len lowered from %d to %d to fit the KV cache", config.max_model_len, fits
            )
            config.max_model_len = fits
        self.num_blocks = num_blocks
        shape = (2, num_blocks, config.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=config.dtype, device=config.device)
            for _ in range(model_config.num_layers)
        ]
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model,
            self.kv_caches,
            config.block_size,
            config.device,
            config.attention_backend,
            forward_fn=compile_forward(self.model, model_config, config),
            seed=config.seed,
            one_row_logits=self._one_row_logits(),
        )
        self.runner.warm_up(self._warmup_steps())
        self.graph_capture_seconds = 0.0
        self._capture_graphs()
        self.requests: dict[str, Request] = {}
        self.async_scheduling = config.async_scheduling
        self.pending: StepOutput | None = None  # launched step whose tokens are not read back yet
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = {eos} if eos is not None else set(model_config.eos_token_id)
        self.structured = StructuredOutputManager(
            config.structured_outputs_config or StructuredOutputsConfig(),
            tokenizer,
            model_config.vocab_size,
            sorted(self.eos_token_ids),
            config.device,
        )
        self._next_seq_id = 0
        self.detokenizers: dict[Sequence, IncrementalDetokenizer] = {}
        self._token_texts: dict[int, str] = {}

    def _warmup_steps(self) -> list:
        """Dummy steps that launch every variant of the Triton attention kernels (none for torch's)."""
        if self.config.attention_backend != "triton":
            return []
        from kiln.ops.triton_attention import warmup_metadata

        mc, cfg = self.model_config, self.config
        return warmup_metadata(
            mc.num_heads, mc.num_kv_heads, mc.head_dim, cfg.block_size, cfg.dtype, cfg.device
        )

    def _one_row_logits(self) -> bool:
        """With ``fuse_gemv`` on CUDA the batch-1 logits come from kiln::gemv too (compiled modes)."""
        cfg = self.config
        if cfg.device.type != "cuda" or cfg.enforce_eager:
            return False
        return CompilationConfig.parse(cfg.compilation_config).pass_config.fuse_gemv

    def _graph_plan(self) -> tuple[list[int], list[int]]:
        """(full-graph decode batch sizes, piecewise token buckets); both empty on CPU, with
        enforce_eager, with the torch attention backend or with cudagraph_mode "none"."""
        cfg = self.config
        if cfg.device.type != "cuda" or cfg.enforce_eager or cfg.attention_backend != "triton":
            return [], []
        cc = CompilationConfig.parse(cfg.compilation_config)
        mode = cc.cudagraph_mode
        sizes = sorted(cc.cudagraph_capture_sizes or default_capture_sizes(cfg.max_num_seqs))
        full = [s for s in sizes if s <= cfg.max_num_seqs] if mode in ("full", "full_and_piecewise") else []
        piecewise = [s for s in sizes if s <= cfg.max_num_batched_tokens]
        compiled = cc.resolved_mode(cfg.device.type) == CompilationMode.PIECEWISE
        if mode not in ("piecewise", "full_and_piecewise") or not compiled:
            piecewise = []
        return full, piecewise

    def _make_decode_graphs(self, kv_caches, sizes, forward_fn, pool=None) -> DecodeGraphs:
        cfg = self.config
        return DecodeGraphs(
            forward_fn,
            kv_caches,
            sizes,
            -(-cfg.max_model_len // cfg.block_size),
            cfg.device,
            cfg.attention_backend,
            pool,
        )

    def _capture_graphs(self) -> None:
        full, piecewise = self._graph_plan()
        if not full and not piecewise:
            return
        cfg, runner = self.config, self.runner
        pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        with tqdm(total=len(full) + len(piecewise), desc="Capturing CUDA graphs", dynamic_ncols=True) as bar:
            if piecewise:
                graphs = PiecewiseGraphs(
                    runner.forward_fn,
                    runner.forward_fn.split_module,
                    self.kv_caches,
                    piecewise,
                    cfg.block_size,
                    cfg.device,
                    cfg.attention_backend,
                    pool,
                )
                graphs.capture(bar)
                runner.piecewise_graphs = graphs
            if full:
                graphs = self._make_decode_graphs(self.kv_caches, full, runner.forward_fn, pool)
                graphs.capture(bar)
                runner.decode_graphs = graphs
        self.graph_capture_seconds = time.perf_counter() - start

    def _graph_memory_reserve(self, scratch) -> int:
        """Memory the graphs' pool will hold: a trial capture of the largest decode bucket, measured,
        plus a fixed 256 MiB for the piecewise graphs' buffers (activations of at most one bucket)."""
        full, piecewise = self._graph_plan()
        reserve = 256 * 2**20 if piecewise else 0
        if not full:
            return reserve
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        trial = self._make_decode_graphs(scratch, full[-1:], self.model.forward)
        trial.capture()
        used = torch.cuda.memory_reserved() - before
        del trial
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return reserve + int(used * 1.1) + 64 * 2**20

    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.tensor([], dtype=self.config.dtype).element_size()
        return 2 * mc.num_layers * self.config.block_size * mc.num_kv_heads * mc.head_dim * elem

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        budget = cfg.kv_cache_memory_bytes
        if budget is None:
            budget = CPU_DEFAULT_KV_CACHE_BYTES if cfg.device.type == "cpu" else self._profile_kv_budget()
        num_blocks = int(budget // self.kv_bytes_per_block())
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds no block of {self.kv_bytes_per_block()} bytes"
            )
        return num_blocks

    def _profile_kv_budget(self) -> int:
        """GPU memory left for the KV cache after weights and a peak-sized forward pass."""
        cfg, mc = self.config, self.model_config
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        other = total - free - torch.cuda.memory_reserved()  # other processes and the CUDA context
        in_use = torch.cuda.memory_allocated()  # this model's weights and anything else this process holds
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        torch.cuda.reset_peak_memory_stats()
        n = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        blocks = -(-n // cfg.block_size)
        scratch = [
            torch.zeros(
                2, blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim, dtype=cfg.dtype, device=cfg.device
            )
            for _ in range(mc.num_layers)
        ]
        dev = cfg.device
        md = AttentionMetadata.single_sequence(n, cfg.block_size, dev)
        with torch.inference_mode(), forward_context(md, scratch, cfg.attention_backend):
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=dev), torch.arange(n, device=dev))
            self.model.compute_logits(hidden[: cfg.max_num_seqs]).float().softmax(-1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        scratch_bytes = sum(t.numel() * t.element_size() for t in scratch)
        del hidden
        graph_reserve = self._graph_memory_reserve(scratch)
        del scratch
        torch.cuda.empty_cache()
        activations = peak - in_use - scratch_bytes
        budget = int(total * cfg.gpu_memory_utilization - other - in_use - activations - graph_reserve)
        if budget <= 0:
            gib = 2**30
            parts = {
                "weights": weights,
                "other tensors of this process (e.g. another LLM)": in_use - weights,
                "activations": activations,
                "CUDA graphs": graph_reserve,
                "other processes": other,
            }
            taken = ", ".join(f"{name} {size / gib:.2f}" for name, size in parts.items())
            raise ValueError(
                f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves no memory for the KV cache: of "
                f"{total / gib:.2f} GiB, {taken} GiB are taken; pass kv_cache_memory_bytes or free the memory"
            )
        return budget

    # ------------------------------------------------------------------ requests

    def validate_params(self, params: SamplingParams) -> None:
        """Checks that need the model or the tokenizer, run before any request of a call is added:
        token ids inside the vocabulary, bad_words encoded, structured outputs parsed (compiling starts)."""
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
            bad = [t for t in ids or () if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
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
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        max_tokens = self.config.max_model_len - len(prompt_token_ids)
        if params.bad_words and not params.bad_words_token_ids:
            params.update_from_tokenizer(self.tokenizer)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.config.device).manual_seed(params.seed + i)
            seq = Sequence(self._next_seq_id, request_id, i, list(prompt_token_ids), params, max_tokens, gen)
            if params.structured_outputs is not None:
                seq.grammar = self.structured.new_state(params)
            self._next_seq_id += 1
            if self.tokenizer is not None and params.detokenize:
                self.detokenizers[seq] = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                )
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, prompt, list(prompt_token_ids), seqs)

    def abort_all(self) -> None:
        """Drop every request and free its KV blocks (the launched step, if any, is discarded)."""
        if self.pending is not None and self.pending.tokens is not None and self.config.device.type == "cuda":
            torch.cuda.synchronize()
        self.pending = None
        sched = self.scheduler
        for seq in list(sched.running) + list(sched.waiting):
            self.kv.free(seq)
            seq.status = Status.FINISHED
        sched.running.clear()
        sched.waiting.clear()
        self.requests.clear()
        self.detokenizers.clear()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the requests that finished in it.

        Steps overlap: step N+1 is launched (its last input tokens taken from step N's device output)
        before step N's tokens are read back, so the host work of one step hides behind the device
        work of the next. A batch with penalties or logprobs needs its tokens on the host and runs
        without overlap. Stops are therefore seen one step late; the extra token is dropped.

        A batch with constrained (structured-output) rows keeps the overlap: step N+1's forward is
        launched first, then step N is read back (its tokens advance the grammar matchers), then the
        grammar's token mask for step N+1 is filled on the host and step N+1's sampler launched with it.
        """
        batch = self.scheduler.schedule()
        finished: list[RequestOutput] = []
        sync = not self.async_scheduling or any(_needs_host_tokens(seq) for seq in batch.seqs)
        read_back = self.pending is not None and (sync or not batch)
        if read_back:
            finished += self._read_back(self.pending)
            self.pending = None
        if not batch:
            # after a read-back, finished sequences have freed blocks: the next step can schedule again
            if not read_back and self.scheduler.has_unfinished():
                if self.structured.wait_for_any(self.scheduler.waiting):  # only grammars compiling
                    return finished
                raise RuntimeError("scheduler produced an empty step while requests are pending")
            return finished
        now = time.time()
        for seq in batch.seqs:
            seq.first_scheduled_time = seq.first_scheduled_time or now
        constrained = any(seq.grammar is not None for seq in batch.seqs)
        launched = self.runner.execute(batch, self.pending, defer_sampling=constrained)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            for target, entry in launched.prompt_logprobs.get(seq, []):
                seq.prompt_logprobs.append(self._logprob_dict(target, entry))
        for seq in launched.seqs:
            seq.output_token_ids.append(PLACEHOLDER)
            if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
                seq.awaiting_finish = True
        previous, self.pending = self.pending, launched
        if previous is not None:
            finished += self._read_back(previous)
        if launched.logits is not None:  # sampling deferred until the matchers have seen step N
            num_generated = [launched.output_index[s] for s in launched.seqs]
            self.runner.sample(launched, self.structured.token_mask(launched.seqs, num_generated))
        if sync:
            finished += self._read_back(launched)
            self.pending = None
        for seq in batch.seqs:  # every token below num_computed_tokens is known on the host by now
            if not seq.is_finished:
                self.kv.cache_computed_blocks(seq)
        return finished

    def _read_back(self, step) -> list[RequestOutput]:
        """Fill in a launched step's tokens and run the per-token bookkeeping (detokenize, stops)."""
        if not step.seqs:
            return []
        tokens = step.token_list()
        now = time.time()
        finished = []
        for seq, token, logprob_entry in zip(step.seqs, tokens, step.logprobs):
            if seq.is_finished:  # it stopped one step earlier; this token is surplus
                continue
            index = step.output_index[seq]
            seq.output_token_ids[index] = token
            if seq.grammar is not None:
                seq.grammar.accept(token)
            self._accept_token(seq, index, token, logprob_entry, now)
            if seq.finish_reason is None:
                continue
            del seq.output_token_ids[index + 1 :]
            self.scheduler.finish(seq)
            self.detokenizers.pop(seq, None)
            request = self.requests[seq.request_id]
            if request.finished:
                request.finished_time = now
                finished.append(self._make_output(self.requests.pop(seq.request_id)))
        return finished

    def _decoded(self, token_id: int) -> str | None:
        """Text of one token, memoised: logprobs=-1 asks for every vocabulary entry at every step."""
        if self.tokenizer is None:
            return None
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _logprob_dict(self, token_id: int, entry) -> dict[int, Logprob]:
        top_ids, top_lps, lp, rank = entry
        result = {token_id: Logprob(lp, rank, self._decoded(token_id))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps), start=1):
            if t not in result:
                result[t] = Logprob(v, r, self._decoded(t))
        return result

    def _accept_token(self, seq: Sequence, index: int, token: int, logprob_entry, now: float) -> None:
        """Token ``index`` of the output is now known: logprobs, stop checks, text."""
        params = seq.params
        seq.first_token_time = seq.first_token_time or now
        if logprob_entry is not None:
            seq.logprobs.append(self._logprob_dict(token, logprob_entry))
            seq.cumulative_logprob += logprob_entry[2]
        num_out = index + 1
        stopped_by_token = False
        # a grammar that accepted its stop token ends the sequence, min_tokens or not
        if num_out >= params.min_tokens or (seq.grammar is not None and seq.grammar.terminated):
            if not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason, stopped_by_token = "stop", True
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason, stopped_by_token = "stop", token, True
        detok = self.detokenizers.get(seq)
        if detok is not None and not (stopped_by_token and not params.include_stop_str_in_output):
            new_text = detok.add(token)
            seq.text += new_text
            if seq.finish_reason is None:
                find_stop_string(seq, len(new_text))
        if seq.finish_reason is None and (
            num_out >= seq.max_tokens or seq.num_prompt_tokens + num_out >= self.config.max_model_len
        ):
            seq.finish_reason = "length"

    def _make_output(self, request: Request) -> RequestOutput:
        first = request.seqs[0]
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=s.logprobs,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in request.seqs
        ]
        metrics = RequestMetrics(
            arrival_time=request.arrival_time,
            first_scheduled_time=min(s.first_scheduled_time for s in request.seqs),
            first_token_time=min(s.first_token_time for s in request.seqs),
            last_token_time=request.finished_time,
            finished_time=request.finished_time,
            time_in_queue=min(s.first_scheduled_time for s in request.seqs) - request.arrival_time,
            num_generation_tokens=sum(len(s.output_token_ids) for s in request.seqs),
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=outputs,
            finished=True,
            metrics=metrics,
            num_cached_tokens=first.num_cached_tokens or 0,
        )


def _needs_host_tokens(seq: Sequence) -> bool:
    """Sampling that reads the previous tokens or returns logprobs cannot run ahead of the read-back."""
    p = seq.params
    return (
        p.logprobs is not None
        or seq.prompt_logprobs is not None
        or p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
        or any(len(ids) > 1 for ids in p.bad_words_token_ids)  # bans follow the last tokens
    )
