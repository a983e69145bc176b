"""Turns a scheduled batch into model inputs, runs the forward (eager, compiled or graph-replayed),
and returns sampled tokens plus requested log-probabilities."""

from dataclasses import dataclass

import torch

import kiln.ops.gemv  # noqa: F401  (registers kiln::gemv)
from kiln.ops.forward_context import forward_context
from kiln.ops.metadata import AttentionMetadata
from kiln.ops.sample_argmax import sample_argmax
from kiln.runtime.sampler import sample, top_logprobs
from kiln.runtime.scheduler import ScheduledBatch
from kiln.runtime.sequence import Sequence
from kiln.runtime.transfer import sections_to_device

PLACEHOLDER = -1  # output token launched but not yet read back from the device


@dataclass
class StepOutput:
    """A launched step. ``tokens`` stays on the device until the engine reads it (one sync per step)."""

    seqs: list[Sequence]  # sequences that sampled a token this step, in row order of ``tokens``
    tokens: torch.Tensor | None
    logprobs: list  # per row: sampled-token logprob info (see sampler.top_logprobs) or None
    prompt_logprobs: dict[Sequence, list]  # (target token, top_logprobs entry) per prompt position
    output_index: dict[Sequence, int]  # where each sampled token goes in seq.output_token_ids
    host_tokens: torch.Tensor | None = None  # pinned copy of ``tokens``, valid once ``ready`` has passed
    ready: "torch.cuda.Event | None" = None
    logits: torch.Tensor | None = None  # launched but not yet sampled (``ModelRunner.sample``)

    def __post_init__(self):
        self._rows = {seq: i for i, seq in enumerate(self.seqs)}

    def row(self, seq: Sequence) -> int:
        return self._rows[seq]

    def copy_out(self) -> None:
        """Start copying ``tokens`` to pinned host memory behind the step's own kernels. Reading them
        later waits for this step only; ``tokens.tolist()`` would also wait for every step launched since."""
        if self.tokens is not None and self.tokens.is_cuda:
            self.host_tokens = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host_tokens.copy_(self.tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def token_list(self) -> list[int]:
        if self.ready is None:
            return self.tokens.tolist()
        self.ready.synchronize()
        return self.host_tokens.tolist()


class ModelRunner:
    def __init__(
        self,
        model,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        attention_backend: str,
        forward_fn=None,
        seed: int = 0,
        one_row_logits: bool = False,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.attention_backend = attention_backend
        self.forward_fn = forward_fn or model.forward
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.decode_graphs = None  # kiln.compiler.cudagraph.DecodeGraphs, set by the engine on CUDA
        self.piecewise_graphs = None  # kiln.compiler.cudagraph.PiecewiseGraphs, likewise
        self.one_row_logits = one_row_logits  # fuse_gemv on CUDA: a one-row batch's logits by kiln::gemv

    @torch.inference_mode()
    def warm_up(self, steps: list[AttentionMetadata]) -> None:
        """Compile before the first request what would otherwise compile during it: run the eager
        model over dummy steps whose metadata stores nothing, and on CUDA the one-row logits and the
        sampler's kernels (greedy and sampled, model dtype and fp32 logits)."""
        for md in steps:
            zeros = torch.zeros(md.slot_mapping.shape[0], dtype=torch.long, device=self.device)
            with forward_context(md, self.kv_caches, self.attention_backend):
                self.model(zeros, zeros)
        if self.device.type != "cuda":
            return
        weight = self.model.logits_weight()
        logits = self.logits(torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=self.device))
        for x in (logits, logits.float()):
            sample_argmax(x)
            sample_argmax(x, torch.ones(1, device=self.device), torch.ones(x.shape, device=self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.one_row_logits and hidden.shape[0] == 1:
            return torch.ops.kiln.gemv(hidden, self.model.logits_weight(), None, None, 0.0, False)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def sample(self, out: StepOutput, token_mask=None) -> None:
        """Launch the sampler on the step's logits and the copy of its tokens to the host."""
        num_generated = [out.output_index[s] for s in out.seqs]
        result = sample(out.logits, out.seqs, self.generator, num_generated, token_mask)
        out.tokens, out.logprobs, out.logits = result.tokens, result.logprobs, None
        out.copy_out()

    def prepare(self, batch: ScheduledBatch, previous: StepOutput | None = None):
        """Device inputs of the step, sent as two pinned host buffers (int64 and int32) so the copies
        never wait for the device. Tokens still on the device from ``previous`` (placeholders) are
        copied there, so the step can be launched before the previous one is read back."""
        bs = self.block_size
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        fix_dst, fix_src, sample_rows, sample_seqs = [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            lo = seq.num_computed_tokens
            tokens = seq.token_slice(lo, lo + n)
            if tokens[-1] == PLACEHOLDER:
                fix_dst.append(len(ids) + n - 1)
                fix_src.append(previous.row(seq))
            ids.extend(tokens)
            positions.extend(range(lo, lo + n))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(lo, lo + n))
            starts.append(starts[-1] + n)
            seq_lens.append(lo + n)
            if lo + n == seq.num_tokens:
                sample_rows.append(starts[-1] - 1)
                sample_seqs.append(seq)
        width = max(len(seq.block_ids) for seq in batch.seqs)
        table = [b for seq in batch.seqs for b in seq.block_ids + [0] * (width - len(seq.block_ids))]
        num_tokens, num_seqs = len(ids), len(seq_lens)
        input_ids, positions_t, slot_mapping, rows, dst, src = sections_to_device(
            [ids, positions, slots, sample_rows, fix_dst, fix_src], self.device, torch.long
        )
        query_start_loc, seq_lens_t, table_t = sections_to_device(
            [starts, seq_lens, table], self.device, torch.int32
        )
        if fix_dst:
            input_ids.index_copy_(0, dst, previous.tokens.index_select(0, src))
        md = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens_t,
            block_tables=table_t.view(num_seqs, width),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
        )
        all_rows = len(sample_rows) == num_tokens
        return input_ids, positions_t, md, starts, (None if all_rows else rows), sample_seqs

    @torch.inference_mode()
    def execute(
        self, batch: ScheduledBatch, previous: StepOutput | None = None, defer_sampling: bool = False
    ) -> StepOutput:
        """Launch the step; sampled tokens stay on the device (``StepOutput.tokens``). With
        ``defer_sampling`` only the forward and the logits are launched: ``sample`` finishes the step
        once the host knows what the sampler needs (the grammar's token mask)."""
        input_ids, positions, md, starts, rows, sample_seqs = self.prepare(batch, previous)
        full, piecewise = self.decode_graphs, self.piecewise_graphs
        if full is not None and md.max_query_len == 1 and md.num_seqs <= full.max_size:
            hidden = full.run(input_ids, positions, md.slot_mapping, md.seq_lens, md.block_tables)
        elif piecewise is not None and input_ids.shape[0] <= piecewise.max_size:
            hidden = piecewise.run(input_ids, positions, md)
        else:
            with forward_context(md, self.kv_caches, self.attention_backend):
                hidden = self.forward_fn(input_ids, positions)

        out = StepOutput(sample_seqs, None, [], {}, {s: len(s.output_token_ids) for s in sample_seqs})
        if sample_seqs:
            out.logits = self.logits(hidden if rows is None else hidden[rows])
            if not defer_sampling:
                self.sample(out)
        # prompt positions of sequences that asked for prompt logprobs
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            lo = seq.num_computed_tokens
            last = min(lo + n, seq.num_prompt_tokens - 1)
            if not seq.wants_prompt_logprobs or last <= lo:
                continue
            row0 = starts[i]
            logprobs = self.model.compute_logits(hidden[row0 : row0 + last - lo]).float().log_softmax(-1)
            targets = seq.prompt_token_ids[lo + 1 : last + 1]
            entries = top_logprobs(logprobs, targets, [seq.params.prompt_logprobs] * len(targets))
            out.prompt_logprobs[seq] = list(zip(targets, entries))
        return out
