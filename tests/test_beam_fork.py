"""Beams forking in place, without a model: the KV-cache manager shares full blocks and copies the
partial one, the scheduler holds sampled beams, releases and forks them, and gives held beams' blocks
back under pressure; ``copy_blocks`` copies every layer's block on the device side."""

import pytest
import torch

from kiln.runtime.block_copy import copy_blocks
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence, Status


def make_beam(seq_id, tokens, max_tokens=8):
    seq = Sequence(seq_id, str(seq_id), 0, list(tokens), SamplingParams(max_tokens=max_tokens), max_tokens)
    seq.beam = True
    return seq


def read_back(out, seqs, token=7):
    """What the output processor does for a read-back step: each sampling sequence accepts ``token``."""
    for s in out.scheduled:
        if s.sample:
            seq = seqs[s.seq_id]
            seq.num_pending_tokens -= 1
            seq.output_token_ids.append(token)


def test_kv_fork_shares_full_blocks_and_copies_the_partial_one():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    parent = make_beam(0, range(10))
    assert kv.allocate(parent, 10)
    parent.num_computed_tokens = 10
    kv.cache_computed_blocks(parent)
    child = parent.fork(1)
    copy = kv.fork(parent, child)
    assert child.block_ids[:2] == parent.block_ids[:2] and child.block_ids[2] != parent.block_ids[2]
    assert copy == (parent.block_ids[2], child.block_ids[2])
    assert [kv.pool.ref_counts[b] for b in parent.block_ids] == [2, 2, 1]
    assert child.num_computed_tokens == 10 and child.num_published_blocks == 2
    assert child.block_hashes == parent.block_hashes
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 8 and not any(kv.pool.ref_counts)


def test_kv_fork_at_a_block_boundary_or_without_a_free_block_copies_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    parent = make_beam(0, range(8))
    assert kv.allocate(parent, 8)
    parent.num_computed_tokens = 8
    child = parent.fork(1)
    assert kv.fork(parent, child) is None  # every computed token is in a full block
    assert child.block_ids == parent.block_ids and child.num_computed_tokens == 8
    other = make_beam(2, range(10))
    assert kv.allocate(other, 1)  # the last free block
    other.block_ids, other.num_computed_tokens = parent.block_ids[:1] + other.block_ids, 6
    kv.pool.take(parent.block_ids[0])
    late = other.fork(3)
    assert kv.fork(other, late) is None  # no block for the copy: the partial block is computed again
    assert late.block_ids == other.block_ids[:1] and late.num_computed_tokens == 4
    for seq in (parent, child, other, late):
        kv.free(seq)
    assert kv.num_free_blocks == 3 and not any(kv.pool.ref_counts)


def test_scheduler_holds_releases_and_forks_beams():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    parent = make_beam(0, range(6))
    seqs = {0: parent}
    sched.add(parent)
    out = sched.schedule_step()
    assert [(s.start, s.num_tokens, s.sample) for s in out.scheduled] == [(0, 6, True)]
    assert parent.status is Status.HELD and sched.held == {0: parent} and not sched.running
    read_back(out, seqs, token=7)
    sched.cache_computed_blocks()
    assert not sched.schedule()  # held: not scheduled until its next token is chosen
    child = parent.fork(1)
    child.choose_last_token(9)
    seqs[1] = child
    sched.fork(parent, child)
    parent.choose_last_token(8)
    sched.release(parent)
    out = sched.schedule_step()
    assert out.copy_blocks == [(parent.block_ids[1], child.block_ids[1])]
    assert [n.seq_id for n in out.new_sequences] == [1]
    # each computes exactly its chosen token, at position 6, and samples
    assert sorted((s.seq_id, s.token_ids, s.start, s.num_tokens) for s in out.scheduled) == [
        (0, [8], 6, 1),
        (1, [9], 6, 1),
    ]
    assert child.block_ids[0] == parent.block_ids[0]
    read_back(out, seqs)
    sched.finish(parent)
    sched.finish(child)
    assert not sched.held and not sched.has_unfinished() and kv.num_free_blocks == 16
    assert sched.schedule_step().copy_blocks == []


def test_a_copy_into_a_block_given_back_is_dropped():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    parent = make_beam(0, range(5))
    sched.add(parent)
    read_back(sched.schedule_step(), {0: parent})
    child = parent.fork(1)
    child.choose_last_token(3)
    sched.fork(parent, child)
    assert sched._copies
    sched.finish(child)  # dropped before any step ran
    parent.choose_last_token(4)
    sched.release(parent)
    assert sched.schedule_step().copy_blocks == []
    sched.finish(parent)
    assert kv.num_free_blocks == 8


def test_held_beams_give_their_blocks_back_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    held = make_beam(0, range(8))  # two full blocks
    seqs = {0: held}
    sched.add(held)
    out = sched.schedule_step()
    read_back(out, seqs)
    sched.cache_computed_blocks()  # as the engine does after each step
    assert held.status is Status.HELD and len(held.block_ids) == 2
    other = make_beam(1, range(100, 111))  # needs three blocks: only two are free
    seqs[1] = other
    sched.add(other)
    out = sched.schedule_step()
    assert [s.seq_id for s in out.scheduled] == [1] and out.scheduled[0].num_tokens == 11
    assert len(held.block_ids) == 0 and held.num_computed_tokens == 0 and sched.num_preemptions == 1
    read_back(out, seqs)
    sched.finish(other)
    held.choose_last_token(5)
    sched.release(held)  # its blocks were taken: it waits and is recomputed, prefix-cache blocks first
    assert held.status is Status.WAITING
    out = sched.schedule_step()
    assert [(s.seq_id, s.start, s.num_tokens) for s in out.scheduled] == [(0, 4, 5)]
    sched.finish(held)
    assert kv.num_free_blocks == 4


def test_a_step_schedules_at_most_max_num_seqs_and_held_beams_do_not_count():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64)
    beams = {i: make_beam(i, range(i, i + 3)) for i in range(5)}
    for seq in beams.values():
        sched.add(seq)
    sizes = []
    while any(seq.status is not Status.HELD for seq in beams.values()):
        out = sched.schedule_step()
        sizes.append(len(out.scheduled))
        read_back(out, beams)
    assert sizes == [2, 2, 1]  # all five sampled, two at a time
    for seq in beams.values():
        sched.finish(seq)
    assert kv.num_free_blocks == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_copy_blocks_copies_keys_and_values_of_every_layer(dtype):
    torch.manual_seed(0)
    caches = [torch.randn(2, 6, 4, 2, 8).to(dtype) for _ in range(3)]
    before = [c.clone() for c in caches]
    copy_blocks(caches, [(1, 4), (2, 0)])
    for c, old in zip(caches, before):
        c, old = c.view(torch.uint8), old.view(torch.uint8)
        assert torch.equal(c[:, 4], old[:, 1]) and torch.equal(c[:, 0], old[:, 2])
        for b in (1, 2, 3, 5):
            assert torch.equal(c[:, b], old[:, b])
