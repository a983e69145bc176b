"""Data parallelism on the CPU: two engine replicas give the outputs of one, in input order, with
tensor parallelism inside each; prompts sharded by count and length; control calls reach every
replica; a replica that dies is an error, not a hang, and no process is left behind."""

import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.distributed import parallel_state
from kiln.distributed.data_parallel import _visible_devices, shard

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(200 + 7 * i, 210 + 9 * i))} for i in range(5)]
BASE = dict(enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=2**22)
two_ranks = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU replicas (CUDA: one device per rank)")


@pytest.fixture(scope="module", autouse=True)
def bounded_waits():
    """Every wait on another rank or replica ends within a minute (children inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_DISTRIBUTED_TIMEOUT", "60")
        yield


def kiln_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith(("kiln-dp-", "kiln-tp-"))]


def tokens_and_logprobs(outputs):
    out = []
    for o in outputs:
        c = o.outputs[0]
        lps = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] if c.logprobs else []
        out.append((list(c.token_ids), lps))
    return out


def assert_same(reference, got):
    for (ref_ids, ref_lp), (ids, lp) in zip(reference, got, strict=True):
        assert ids == ref_ids
        assert all(abs(a - b) < 1e-4 for a, b in zip(ref_lp, lp))


def test_shards_balance_count_and_length():
    lengths = [100, 5, 5, 5, 5, 90, 10, 7]
    shards = shard(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(8))
    assert [len(s) for s in shards] == [4, 4]
    tokens = [sum(lengths[i] for i in s) for s in shards]
    assert abs(tokens[0] - tokens[1]) <= 20  # 100 and 90 on different replicas
    assert all(not {0, 5} <= set(s) for s in shards)
    assert shard([3, 1], 3) == [[0], [1], []]  # fewer prompts than replicas
    assert [len(s) for s in shard([1] * 7, 3)] == [3, 2, 2]


def test_replica_devices_are_the_ones_this_process_sees(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 5,6,7")
    assert _visible_devices()[2:4] == ["6", "7"]  # replica 1 of two ranks each


@two_ranks
def test_two_replicas_give_the_outputs_of_one_in_input_order(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    params = [GREEDY, SEEDED, GREEDY, SEEDED, GREEDY]
    choice = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": ["yes", "no"]})
    with LLM(path, **BASE) as one:
        reference = one.generate(PROMPTS, params, use_tqdm=False)
        constrained = [o.outputs[0].token_ids for o in one.generate(PROMPTS[:3], choice, use_tqdm=False)]
    with LLM(path, data_parallel_size=2, **BASE) as two:
        got = two.generate(PROMPTS, params, use_tqdm=False)
        if importlib.util.find_spec("xgrammar") is not None:  # grammars compiled in each replica
            assert [o.outputs[0].token_ids for o in two.generate(PROMPTS[:3], choice, use_tqdm=False)] == (
                constrained
            )
        assert [o.prompt_token_ids for o in got] == [p["prompt_token_ids"] for p in PROMPTS]
        assert [o.request_id for o in got] == [str(i) for i in range(5)]
        assert_same(tokens_and_logprobs(reference), tokens_and_logprobs(got))
        again = two.generate(PROMPTS[:3], GREEDY, use_tqdm=False)  # ids go on from the earlier calls
        assert [o.request_id for o in again] == ["8", "9", "10"]
        assert two.get_world_size() == 2 and two.get_world_size(include_dp=False) == 1
        pids = two.collective_rpc(worker_pid)
        assert len(pids) == 2 and pids[0] == os.getpid() and pids[1] != pids[0]
        assert two.apply_model(parameter_count) == one_count(path) * 2
        with pytest.raises(ValueError, match="max_tokens"):  # checked before anything runs
            two.generate(PROMPTS, SamplingParams(max_tokens=0), use_tqdm=False)
        assert not two.llm_engine.has_unfinished_requests()
        two.sleep(level=1)
        assert two.collective_rpc(is_asleep) == [True, True]
        two.wake_up()
        assert_same(
            tokens_and_logprobs(reference[:1]),
            tokens_and_logprobs(two.generate(PROMPTS[:1], GREEDY, use_tqdm=False)),
        )
    assert kiln_children() == []


@two_ranks
def test_two_replicas_serve_lora_adapters_like_one(tiny_checkpoint, tmp_path):
    """Each replica reads the adapters of its shard itself (the path travels, not the weights)."""
    pytest.importorskip("peft")
    from lora_oracle import make_adapter

    from kiln import LoRARequest

    path = tiny_checkpoint("llama")
    adapter = LoRARequest("attn-qv", 1, make_adapter(path, str(tmp_path / "a"), "attn-qv", seed=3))
    loras = [adapter, None, adapter, None]
    kw = dict(BASE, enable_lora=True, max_lora_rank=8)
    with LLM(path, **kw) as one:
        reference = tokens_and_logprobs(one.generate(PROMPTS[:4], GREEDY, lora_request=loras, use_tqdm=False))
        base = tokens_and_logprobs(one.generate(PROMPTS[:1], GREEDY, use_tqdm=False))
    assert reference[0][0] != base[0][0]  # the adapter changes the output
    with LLM(path, data_parallel_size=2, **kw) as two:
        got = two.generate(PROMPTS[:4], GREEDY, lora_request=loras, use_tqdm=False)
        assert_same(reference, tokens_and_logprobs(got))
        assert [o.lora_request for o in got] == loras
    assert kiln_children() == []


def one_count(path):
    with LLM(path, **BASE) as one:
        return one.apply_model(parameter_count)


def worker_pid(worker):
    return os.getpid()


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def is_asleep(worker):
    return bool(worker.asleep)


def rank_of(worker):
    return parallel_state.get().rank


@two_ranks
def test_two_replicas_of_two_ranks(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    with LLM(path, **BASE) as one:
        reference = tokens_and_logprobs(one.generate(PROMPTS, GREEDY, use_tqdm=False))
    with LLM(path, data_parallel_size=2, tensor_parallel_size=2, **BASE) as llm:
        assert_same(reference, tokens_and_logprobs(llm.generate(PROMPTS, GREEDY, use_tqdm=False)))
        assert llm.get_world_size() == 4 and llm.get_world_size(include_dp=False) == 2
        assert llm.collective_rpc(rank_of) == [0, 1, 0, 1]
    assert kiln_children() == []


@two_ranks
def test_a_killed_replica_gives_an_error_not_a_hang(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), data_parallel_size=2, **BASE)
    try:
        proc = llm._replicas.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"replica 1 \(pid \d+\) exited with code -9"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 30
        assert not llm.llm_engine.has_unfinished_requests()
    finally:
        llm.shutdown()
    assert kiln_children() == []


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@two_ranks
def test_killing_the_first_replica_leaves_no_process_behind(tiny_checkpoint):
    """The LLM's process killed outright: its replica and every rank process exit by themselves."""
    script = textwrap.dedent(
        f"""
        from kiln import LLM
        if __name__ == "__main__":
            llm = LLM({tiny_checkpoint("llama")!r}, data_parallel_size=2, tensor_parallel_size=2,
                      enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=2**22)
            print("ready", flush=True)
            import time
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = descendants(proc.pid)
        assert len([c for c in children if alive(c)]) >= 3  # its rank, the replica, the replica's rank
    finally:
        proc.kill()
        proc.wait(10)
    end = time.monotonic() + 30
    while any(alive(c) for c in children) and time.monotonic() < end:
        time.sleep(0.2)
    left = [c for c in children if alive(c)]
    for c in left:
        os.kill(c, signal.SIGKILL)
    assert left == []
