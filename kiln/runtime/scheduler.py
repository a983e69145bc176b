"""Continuous-batching scheduler: one token budget per step shared by decodes and (chunked) prefills.

Every sequence simply has tokens not yet computed: ``num_tokens - num_computed_tokens`` (the whole
prompt at first, one token while decoding). Each step first serves running sequences in arrival
order, preempting the newest running ones (freeing their blocks; they are recomputed later) when the
KV cache is full, then admits waiting sequences FCFS while budget, sequence slots and blocks last.
A sequence whose launched tokens already reach its length limit is not scheduled again: it only
waits for the engine to read its last token back. A waiting sequence whose grammar is still compiling
is passed over (it keeps its place) without holding up the ones behind it.
"""

from collections import deque
from dataclasses import dataclass

from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.sequence import Sequence, Status


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
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.status, seq.num_computed_tokens = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.awaiting_finish:  # its last launched token already ends it; only the read-back is due
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        compiling = []  # waiting sequences whose grammar is not compiled yet keep their place
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.grammar_pending:
                compiling.append(self.waiting.popleft())
                continue
            cached = self.kv.lookup_prefix(seq)
            n = min(seq.num_tokens - len(cached) * self.kv.block_size, budget)
            if not self.kv.allocate(seq, n, cached):
                break
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

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:  # preempted while its last token was still being read back
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.kv.free(seq)
