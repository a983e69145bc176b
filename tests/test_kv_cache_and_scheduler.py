"""Block pool, prefix cache and scheduler bookkeeping, without a model."""

import random

from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence


def make_seq(seq_id, tokens, max_tokens=4):
    return Sequence(seq_id, str(seq_id), 0, list(tokens), SamplingParams(max_tokens=max_tokens), max_tokens)


def run_to_completion(sched: Scheduler, rng: random.Random):
    """Drive the scheduler like the engine does, with random sampled tokens."""
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch, "scheduler stalled"
        assert batch.total_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(seq.block_ids) * sched.kv.block_size >= seq.num_computed_tokens + n
            seq.num_computed_tokens += n
            sched.kv.cache_computed_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(rng.randrange(50))
                if len(seq.output_token_ids) >= seq.max_tokens:
                    sched.finish(seq)
        steps += 1
    return steps


def test_no_block_leaked_after_1000_random_requests():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=48)
    shared = [rng.randrange(50) for _ in range(12)]
    for i in range(1000):
        prefix = shared[: rng.randrange(13)]
        tokens = prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
        sched.add(make_seq(i, tokens, max_tokens=rng.randrange(1, 20)))
    run_to_completion(sched, rng)
    assert kv.num_free_blocks == 64
    assert all(c == 0 for c in kv.pool.ref_counts)
    assert kv.hits > 0  # shared prefixes were found in the cache
    assert sched.num_preemptions > 0  # 64 blocks cannot hold 16 sequences of this length


def test_prefix_hit_counted_and_blocks_shared():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    first = make_seq(0, range(10))
    sched.add(first)
    run_to_completion(sched, random.Random(0))
    second = make_seq(1, list(range(10)) + [42])
    sched.add(second)
    batch = sched.schedule()
    assert batch.num_new_tokens == [3]  # 8 of 11 tokens (two full blocks) came from the cache
    assert second.num_cached_tokens == 8
    assert kv.hits == 8


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(2):
        sched.add(make_seq(i, range(10)))
        run_to_completion(sched, random.Random(0))
    assert kv.hits == 0


def test_lru_eviction_order():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a, b = make_seq(0, [1, 2, 3]), make_seq(1, [5, 6, 7])
    for seq in (a, b):
        assert kv.allocate(seq, 3)
        seq.num_computed_tokens = 3
        kv.cache_computed_blocks(seq)
    a_full, b_full = a.block_ids[0], b.block_ids[0]
    kv.free(a)  # a's blocks are freed first: least recently used
    kv.free(b)
    c = make_seq(2, [9, 9, 9, 9, 9])  # needs 3 blocks: evicts a's two blocks and then b's tail block
    assert kv.allocate(c, 5)
    assert kv.pool.hash_of[a_full] is None
    assert kv.pool.hash_of[b_full] is not None
    assert kv.lookup_prefix(make_seq(3, [5, 6, 7])) == [b_full]
    assert kv.lookup_prefix(make_seq(4, [1, 2, 3])) == []


def test_cached_free_block_is_reclaimed_not_double_counted():
    kv = KVCacheManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    a = make_seq(0, [1, 2, 3])
    assert kv.allocate(a, 3)
    a.num_computed_tokens = 3
    kv.cache_computed_blocks(a)
    kv.free(a)
    b = make_seq(1, [1, 2, 4])
    cached = kv.lookup_prefix(b)
    assert len(cached) == 1
    assert kv.allocate(b, 1, cached)  # one cached block + one new block fit in two
    assert kv.num_free_blocks == 0
    assert not kv.allocate(make_seq(2, [7]), 1)


def test_scheduler_respects_budget_and_chunks_long_prompt():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    long_seq, short_seq = make_seq(0, range(25)), make_seq(1, range(3))
    sched.add(long_seq)
    sched.add(short_seq)
    assert sched.schedule().num_new_tokens == [10]
    long_seq.num_computed_tokens = 10
    batch = sched.schedule()
    assert batch.seqs == [long_seq]
    assert batch.num_new_tokens == [10]
