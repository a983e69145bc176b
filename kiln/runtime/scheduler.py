"""Continuous-batching scheduler: one token budget per step shared by decodes and (chunked) prefills.

Every sequence simply has tokens not yet computed: ``num_tokens - num_computed_tokens`` (the whole
prompt at first, one token while decoding). Each step first serves running sequences in arrival
order, preempting the newest running ones (freeing their blocks; they are recomputed later) when the
KV cache is full, then admits waiting sequences while budget, sequence slots and blocks last: first
come first served, or with ``policy="priority"`` by (priority, arrival), preempting the running
sequence latest in that order. Without chunked prefill a prompt is admitted only when all its
remaining tokens fit in the step.
A sequence whose launched tokens already reach its length limit is not scheduled again: it only
waits for the engine to read its last token back. A waiting sequence whose grammar is still compiling
is passed over (it keeps its place) without holding up the ones behind it.

Beams (``Sequence.beam``, ``LLM.beam_search``) fork in place. A beam that samples is *held*
(``Status.HELD``, in ``held``): it keeps its blocks but is not scheduled until the search has chosen
its next token (``release``) or dropped it (``finish``). ``fork`` adds a copy of a held beam that
shares its full blocks and gets a copy of its last, partial block: the ``(src, dst)`` pair goes to the
worker in the next step's ``SchedulerOutput.copy_blocks``. A step schedules at most ``max_num_seqs``
sequences; held ones count neither there nor for admission. When blocks run out, held beams give
theirs back first (they are recomputed once released, from the prefix cache where it still has
their blocks), then running sequences are preempted as usual; a waiting sequence that cannot be
admitted into an otherwise empty step also takes held beams' blocks.

``schedule_step()`` is what the engine calls: it schedules, then turns the batch into the worker's
plain-data ``SchedulerOutput`` and advances each sequence past the launched tokens (computed tokens,
one pending output token for each sequence that samples).
"""

import time
from collections import deque
from dataclasses import dataclass

from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.sequence import Sequence, Status
from kiln.runtime.step_data import NewSequence, ScheduledSequence, SchedulerOutput


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens computed for each seq this step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int | None = None,
        policy: str = "fcfs",
        chunked_prefill: bool = True,
        lora=None,
    ):
        self.kv = kv
        self.lora = lora  # kiln.lora.manager.LoRAManager, or None without enable_lora
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_needing_host_tokens = 0  # unfinished sequences whose sampling reads host tokens
        self.num_constrained = 0  # unfinished sequences with structured outputs (a grammar's mask)
        self._new: list[NewSequence] = []  # added since the last step
        self._finished: list[int] = []  # seq ids finished since the last step
        self.held: dict[int, Sequence] = {}  # beams waiting for their next token, by id (oldest first)
        self._copies: dict[int, int] = {}  # dst block -> src block, copied before the next forward
        self._filled: list[Sequence] = []  # the last step's sequences with a block newly full

    def _order(self, seq: Sequence) -> tuple[int, int]:
        return (seq.priority, seq.seq_id) if self.policy == "priority" else (0, seq.seq_id)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """FCFS: new sequences at the back, preempted ones at the front; priority: by (priority, arrival)."""
        if self.policy != "priority":
            self.waiting.appendleft(seq) if front else self.waiting.append(seq)
            return
        key = self._order(seq)
        pos = next((i for i, other in enumerate(self.waiting) if self._order(other) > key), len(self.waiting))
        self.waiting.insert(pos, seq)

    def add(self, seq: Sequence) -> None:
        self._enqueue(seq, front=False)
        p = seq.params
        self._new.append(NewSequence(seq.seq_id, None if p.seed is None else p.seed + seq.index))
        self._count(seq, 1)

    def _count(self, seq: Sequence, delta: int) -> None:
        """Keep the counts of unfinished sequences needing host tokens or a grammar's mask."""
        if needs_host_tokens(seq):
            self.num_needing_host_tokens += delta
        if seq.params.structured_outputs is not None:
            self.num_constrained += delta

    def has_unfinished(self) -> bool:
        """Sequences a step would run; held beams wait for their search, not for a step."""
        return bool(self.waiting or self.running)

    def _free(self, seq: Sequence) -> None:
        if self._copies:  # a copy into a block given back is void
            for b in seq.block_ids:
                self._copies.pop(b, None)
        self.kv.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status, seq.num_computed_tokens = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq, front=True)

    def _victim(self, start: int) -> Sequence:
        """The running sequence to preempt among those not yet scheduled this step (``running[start:]``):
        the newest, or under priority the last in (priority, arrival)."""
        candidates = self.running[start:]
        victim = max(candidates, key=self._order) if self.policy == "priority" else candidates[-1]
        self.running.remove(victim)
        return victim

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        seqs, counts = batch.seqs, batch.num_new_tokens
        running, max_num_seqs, bs = self.running, self.max_num_seqs, self.kv.block_size
        preempted = False
        i = 0
        while i < len(running) and budget > 0 and len(seqs) < max_num_seqs:  # runs for every running seq
            seq = running[i]
            if seq.awaiting_finish:  # its last launched token already ends it; only the read-back is due
                i += 1
                continue
            computed = seq.num_computed_tokens
            left = len(seq.prompt_token_ids) + len(seq.output_token_ids) + seq.num_pending_tokens - computed
            n = left if left < budget else budget
            if computed + n <= len(seq.block_ids) * bs:  # within its blocks: nothing to allocate
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1
                continue
            while not self.kv.allocate(seq, n):
                if self._preempt_held():
                    continue
                victim = self._victim(i)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1
        compiling = []  # waiting sequences whose grammar is not compiled yet keep their place
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.grammar_pending:
                compiling.append(self.waiting.popleft())
                continue
            if not self._lora_admits(seq):
                break
            cached = self.kv.lookup_prefix(seq)
            remaining = seq.num_tokens - len(cached) * self.kv.block_size
            n = min(remaining, budget)
            if n < remaining and not self.chunked_prefill:
                break
            if not self.kv.allocate(seq, n, cached):
                if batch or not self._preempt_held():  # with nothing to run, held beams make room
                    break
                continue
            self.waiting.popleft()
            seq.num_computed_tokens = len(cached) * self.kv.block_size
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
                self.kv.record_lookup(seq.num_tokens, seq.num_computed_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(compiling))
        return batch

    def preempt_all(self) -> None:
        """Move every running sequence back to waiting, its blocks freed (recomputed when rescheduled)."""
        while self.running:
            self._preempt(self.running.pop())
        while self._preempt_held():
            pass

    def _preempt_held(self) -> bool:
        """Free the blocks of the newest held beam that has any (recomputed once released); False if none."""
        for seq in reversed(self.held.values()):
            if seq.block_ids:
                self._free(seq)
                seq.num_computed_tokens = 0
                seq.num_preemptions += 1
                self.num_preemptions += 1
                return True
        return False

    def release(self, seq: Sequence) -> None:
        """A held beam goes on (its next token chosen): running from its computed tokens, or, if its
        blocks were taken, waiting to be recomputed."""
        del self.held[seq.seq_id]
        if seq.num_computed_tokens:
            seq.status = Status.RUNNING
            self.running.append(seq)
        else:
            seq.status = Status.WAITING
            self._enqueue(seq, front=True)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Add ``child``, a copy of the tokens of ``parent`` (a beam whose last token is not computed):
        it shares the parent's computed KV (``KVCacheManager.fork``; a partial block's copy is queued
        for the next step) and runs from there, or waits to be recomputed if the parent has no blocks."""
        copy = self.kv.fork(parent, child)
        if copy is not None:
            self._copies[copy[1]] = copy[0]
        if child.num_computed_tokens:
            child.status = Status.RUNNING
            self.running.append(child)
        else:
            self._enqueue(child, front=True)
        p = child.params
        self._new.append(NewSequence(child.seq_id, None if p.seed is None else p.seed + child.index))
        self._count(child, 1)

    def schedule_step(self) -> SchedulerOutput:
        """Schedule one step and hand it over as plain data; the scheduled tokens count as computed
        from now on, and each sequence that samples holds one pending token until it is read back."""
        batch = self.schedule()
        if not batch:
            return SchedulerOutput()  # nothing launches: new and finished sequences wait for the next step
        out = SchedulerOutput(new_sequences=self._new, finished_seq_ids=self._finished)
        self._new, self._finished = [], []
        if self._copies:
            out.copy_blocks = [(src, dst) for dst, src in self._copies.items()]
            self._copies = {}
        held = False
        now = time.time()
        limit = self.max_model_len
        scheduled = out.scheduled
        publish = self.kv.enable_prefix_caching
        bs = self.kv.block_size
        self._filled = filled = []  # sequences a block of which fills this step: published after it
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # runs for every sequence of every step
            prompt, output = seq.prompt_token_ids, seq.output_token_ids
            lo = seq.num_computed_tokens
            num_prompt = len(prompt)
            known = num_prompt + len(output)
            pending = seq.num_pending_tokens
            hi = lo + n
            sample = hi == known + pending and seq.pooling is None
            end = hi if hi < known else known
            if lo >= num_prompt:  # decoding: the tokens are output tokens
                token_ids = output[lo - num_prompt : end - num_prompt]
            else:
                token_ids = seq.token_slice(lo, end)
            p = seq.params
            num_output = known - num_prompt + pending
            owed = (
                p.prompt_logprobs if seq.prompt_logprobs is not None and seq.wants_prompt_logprobs else None
            )
            s = ScheduledSequence(  # positional: this runs for every sequence of every step
                seq.seq_id,
                token_ids,
                lo,  # start
                n,  # num_tokens
                hi > known,  # last_token_pending
                seq.block_ids,
                sample,
                p,
                num_output,
                prompt,
                output,
                owed,  # prompt_logprobs
                len(seq.prompt_logprobs) if owed is not None else 0,  # prompt_logprobs_done
            )
            if seq.pooling is not None:
                s.pooling = seq.pooling.pooling
            if seq.lora is not None:
                s.lora_slot = self.lora.slot_for(seq.lora)
            scheduled.append(s)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            seq.num_computed_tokens = hi
            if publish and hi // bs != seq.num_published_blocks:
                filled.append(seq)
            if sample:
                seq.num_pending_tokens = pending + 1
                if num_output + 1 >= seq.max_tokens or (limit is not None and known + pending + 1 >= limit):
                    seq.awaiting_finish = True
                if seq.beam:
                    seq.status, self.held[seq.seq_id], held = Status.HELD, seq, True
        if held:
            self.running = [s for s in self.running if s.status is Status.RUNNING]
        return out

    def _lora_admits(self, seq: Sequence) -> bool:
        """A sequence's adapter must hold a device slot while it runs; with every slot used by running
        sequences, it waits."""
        if self.lora is None or seq.lora is None:
            return True
        return self.lora.admit(seq.lora, {s.lora_id for s in self.running if s.lora is not None})

    def cache_computed_blocks(self) -> None:
        """Publish the blocks the last step filled, of its unfinished sequences (their tokens are known
        by now); a step's other sequences have no block to publish."""
        filled, self._filled = self._filled, []
        for seq in filled:
            if not seq.is_finished:
                self.kv.cache_computed_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:  # preempted while its last token was still being read back
            self.waiting.remove(seq)
        elif seq.status is Status.HELD:
            del self.held[seq.seq_id]
        else:
            return
        seq.status = Status.FINISHED
        # publish its last full blocks first: a request with the same prefix reuses them
        self.kv.cache_computed_blocks(seq, min(seq.num_computed_tokens, seq.num_known_tokens))
        self._free(seq)
        self._finished.append(seq.seq_id)
        self._count(seq, -1)

    def abort_all(self) -> list[Sequence]:
        """Finish every sequence (freeing its blocks); returns them."""
        seqs = list(self.running) + list(self.waiting) + list(self.held.values())
        for seq in seqs:
            self.finish(seq)
        return seqs


def needs_host_tokens(seq: Sequence) -> bool:
    """Sampling that reads the previous tokens or returns logprobs cannot run ahead of the read-back."""
    p = seq.params
    return (
        p.logprobs is not None
        or p.prompt_logprobs is not None
        or p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
        or any(len(ids) > 1 for ids in p.bad_words_token_ids)  # bans follow the last tokens
    )
