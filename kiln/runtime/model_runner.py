"""Runs one ``SchedulerOutput`` on the worker's model: flat inputs, the forward (graph replay,
compiled or eager, as ``CudaGraphs.dispatch`` picks), logits, sampling; returns a ``RunnerOutput``
whose tokens stay on the device until the engine reads them back."""

from array import array

import torch

import kiln.ops.gemv  # noqa: F401  (registers kiln::gemv)
from kiln.compiler.cudagraph import CudaGraphs
from kiln.ops.attention_backend import AttentionBackend
from kiln.ops.forward_context import forward_context
from kiln.pooling.state import PooledRows
from kiln.runtime.sampler import sample
from kiln.runtime.step_data import RunnerOutput, SchedulerOutput
from kiln.runtime.top_logprobs import top_logprobs
from kiln.structured.token_mask import GrammarBitmask


class ModelRunner:
    def __init__(
        self,
        model,
        forward,
        attention: AttentionBackend,
        graphs: CudaGraphs,
        device: torch.device,
        seed: int = 0,
        one_row_logits: bool = False,
        logprobs_mode: str = "raw_logprobs",
        lora=None,
    ):
        self.model, self.forward, self.attention, self.graphs = model, forward, attention, graphs
        self.device = device
        self.kv_caches: list[torch.Tensor] = []  # set by the worker once the cache is allocated
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.generators: dict[int, torch.Generator | None] = {}  # per sequence: its seeded generator
        self.num_seeded = 0  # generators above that are not None
        self.one_row_logits = one_row_logits  # fuse_gemv on CUDA: a one-row batch's logits by kiln::gemv
        self.logprobs_mode = logprobs_mode
        self.lora = lora  # kiln.lora.manager.LoRAManager: its per-token slot buffers are filled each step
        self.previous: RunnerOutput | None = None  # the last launched step (source of pending tokens)
        self.deferred: tuple | None = None  # (result, logits, rows) of a step whose sampling waits
        self._previous_rows: dict[int, int] = {}
        self.pooled_rows = PooledRows()  # pooling requests' partial pools, by sequence id
        n = max([*graphs.full_sizes, *graphs.piecewise_sizes], default=0)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)  # graph inputs, fixed addresses
        self.positions = torch.zeros(n, dtype=torch.long, device=device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.one_row_logits and hidden.shape[0] == 1:
            return torch.ops.kiln.gemv(hidden, self.model.logits_weight(), None, None, 0.0, False)
        return self.model.compute_logits(hidden)

    def run_forward(self, input_ids, positions, md) -> torch.Tensor:
        """The forward of a step, padded to a CUDA-graph bucket when one serves it."""
        n = input_ids.shape[0]
        mode, size = self.graphs.dispatch(n, md.num_seqs, md.max_query_len == 1)
        if mode != "none":
            md = (
                self.attention.graph_metadata(md, size) if mode == "full" else self.attention.padded(md, size)
            )
            self.input_ids[:n].copy_(input_ids)
            self.positions[:n].copy_(positions)
            input_ids, positions = self.input_ids[:size], self.positions[:size]
        with forward_context(md, self.kv_caches, self.attention, mode, size):
            hidden = self.forward(input_ids, positions)
        return hidden[:n] if mode != "none" else hidden

    def _update_states(self, out: SchedulerOutput) -> None:
        for new in out.new_sequences:
            gen = None
            if new.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(new.seed)
            self.num_seeded += (gen is not None) - (self.generators.get(new.seq_id) is not None)
            self.generators[new.seq_id] = gen
        for seq_id in out.finished_seq_ids:
            self.num_seeded -= self.generators.pop(seq_id, None) is not None
            self.pooled_rows.forget(seq_id)

    def _prepare(self, out: SchedulerOutput):
        bs = self.block_size
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        fix_dst, fix_src, sample_rows, samples = [], [], [], []
        scheduled = out.scheduled
        width = max(len(s.block_ids) for s in scheduled)
        table, zeros = array("i"), array("i", bytes(4 * width))  # rows copied in whole (block_table)
        max_query_len = 0
        for s in scheduled:  # runs for every sequence of every step: kept lean
            lo, n = s.start, s.num_tokens
            ids.extend(s.token_ids)
            if s.last_token_pending:
                fix_dst.append(len(ids))
                fix_src.append(self._previous_rows[s.seq_id])
                ids.append(0)
            blocks = s.block_ids
            if n == 1:
                positions.append(lo)
                slots.append(blocks[lo // bs] * bs + lo % bs)
            else:
                positions.extend(range(lo, lo + n))
                slots.extend(blocks[p // bs] * bs + p % bs for p in range(lo, lo + n))
                max_query_len = max(max_query_len, n)
            if type(blocks) is array:  # the engine's block tables: one memory copy
                table.extend(blocks)
            else:
                table.fromlist(blocks)
            if len(blocks) < width:
                table.extend(zeros[: width - len(blocks)])
            starts.append(starts[-1] + n)
            seq_lens.append(lo + n)
            if s.sample:
                sample_rows.append(starts[-1] - 1)
                samples.append(s)
        max_query_len = max_query_len or 1
        md, (input_ids, positions_t, rows, dst, src) = self.attention.build(
            slots, starts, seq_lens, table, max_query_len, [ids, positions, sample_rows, fix_dst, fix_src]
        )
        if fix_dst:
            input_ids.index_copy_(0, dst, self.previous.tokens.index_select(0, src))
        if self.lora is not None:
            self.lora.batch.set([(s.lora_slot, s.num_tokens) for s in out.scheduled])
        all_rows = len(sample_rows) == len(ids)
        return input_ids, positions_t, md, starts, (None if all_rows else rows), samples

    def _sample(self, result: RunnerOutput, logits, samples, token_mask=None) -> None:
        sampled = sample(logits, samples, self.generator, self.logprobs_mode, token_mask)
        result.tokens, result.logprobs = sampled.tokens, sampled.logprobs
        result.copy_out()

    @torch.inference_mode()
    def sample_deferred(self, grammar_bitmask: GrammarBitmask | None) -> None:
        """Sample the step launched with ``defer_sampling``, under the grammar's mask (host data)."""
        if self.deferred is None:  # nothing sampled in that step
            return
        (result, logits, samples), self.deferred = self.deferred, None
        mask = None if grammar_bitmask is None else grammar_bitmask.to_device(self.device)
        self._sample(result, logits, samples, mask)

    @property
    def block_size(self) -> int:
        return self.attention.block_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Launch the step; sampled tokens stay on the device (``RunnerOutput.tokens``). With
        ``out.defer_sampling`` only the forward and the logits: ``sample_deferred`` finishes it."""
        self.deferred = None
        self._update_states(out)
        input_ids, positions, md, starts, rows, samples = self._prepare(out)
        hidden = self.run_forward(input_ids, positions, md)
        result = RunnerOutput([s.seq_id for s in samples], None, [], {})
        scheduled = out.scheduled  # the per-row checks below read one field of every row into a list
        if [s.pooling for s in scheduled].count(None) != len(scheduled):
            result.pooled = self.pooled_rows.collect(hidden, scheduled, starts)
        if samples:
            if self.num_seeded:  # rows of seeded sequences draw from their own generator
                for s in samples:
                    s.generator = self.generators.get(s.seq_id)
            logits = self.logits(hidden if rows is None else hidden[rows])
            if out.defer_sampling:
                self.deferred = (result, logits, samples)
            else:
                self._sample(result, logits, samples)
        owing = [s.prompt_logprobs for s in scheduled].count(None) != len(scheduled)
        for i, s in enumerate(scheduled if owing else ()):  # prompt positions owing prompt logprobs
            if s.prompt_logprobs is None:
                continue
            lo = max(s.start, s.prompt_logprobs_done - 1)
            last = min(s.start + s.num_tokens, len(s.prompt_token_ids) - 1)
            if last <= lo:
                continue
            row0 = starts[i] + lo - s.start
            logprobs = self.model.compute_logits(hidden[row0 : row0 + last - lo]).float().log_softmax(-1)
            targets = s.prompt_token_ids[lo + 1 : last + 1]
            entries = top_logprobs(logprobs, targets, [s.prompt_logprobs] * len(targets))
            result.prompt_logprobs[s.seq_id] = list(zip(targets, entries))
        self.previous = result
        self._previous_rows = dict(zip(result.seq_ids, range(len(result.seq_ids))))
        return result
