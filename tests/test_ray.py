"""Ray: tensor-parallel ranks as Ray actors (``distributed_executor_backend="ray"``) on a local CPU
cluster, and the Ray Data example (``examples/ray_data_offline.py``) with two actors. Every Ray process
is gone afterwards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.distributed import parallel_state

ray = pytest.importorskip("ray")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
PROMPTS = [{"prompt_token_ids": list(range(200 + 7 * i, 212 + 9 * i))} for i in range(4)]
BASE = dict(enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=2**22)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU cluster tests (CUDA: GPU tests)")


@pytest.fixture(scope="module", autouse=True)
def bounded_waits():
    """Every wait on another rank or replica ends within a minute (children inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_DISTRIBUTED_TIMEOUT", "60")
        yield


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def process_gone(pid: int, timeout: float = 20.0) -> bool:
    """The process has exited (a zombie not yet reaped by Ray counts as exited)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def wait_gone(text: str, timeout: float = 20.0) -> list[int]:
    end = time.monotonic() + timeout
    while processes_mentioning(text) and time.monotonic() < end:
        time.sleep(0.2)
    return processes_mentioning(text)


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU Ray cluster with its own temporary directory (to find its processes)."""
    tmp = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, _temp_dir=tmp)
    yield tmp
    ray.shutdown()
    assert wait_gone(tmp) == []
    shutil.rmtree(tmp, ignore_errors=True)


def sampled(outputs):
    return [
        (
            list(o.outputs[0].token_ids),
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
        )
        for o in outputs
    ]


def rank_of(worker):
    return parallel_state.get().rank


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_ranks_as_ray_actors_match_one_rank(cluster, tiny_checkpoint):
    path = tiny_checkpoint("llama")
    with LLM(path, **BASE) as one:
        reference = sampled(one.generate(PROMPTS, GREEDY, use_tqdm=False))
        full = one.apply_model(weight_bytes)[0]
    with LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray", **BASE) as two:
        got = sampled(two.generate(PROMPTS, GREEDY, use_tqdm=False))
        for (ref_ids, ref_lp), (ids, lp) in zip(reference, got, strict=True):
            assert ids == ref_ids and max(abs(a - b) for a, b in zip(ref_lp, lp)) < 1e-4
        assert two.collective_rpc(rank_of) == [0, 1]
        sizes = two.apply_model(weight_bytes)
        assert sizes[0] == sizes[1] and sizes[0] < full * 0.6  # each rank about half of the weights
        assert two.get_world_size() == 2
        actor_pid = two.llm_engine.worker.ranks[0].pid
        assert actor_pid != os.getpid() and processes_mentioning(cluster)  # a Ray worker process
        two.sleep(level=1)
        two.wake_up()
        assert sampled(two.generate(PROMPTS[:1], GREEDY, use_tqdm=False))[0][0] == reference[0][0]
    assert process_gone(actor_pid)
    assert not torch.distributed.is_initialized()


def test_a_killed_actor_gives_an_error_not_a_hang(cluster, tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, distributed_executor_backend="ray", **BASE)
    try:
        pid = llm.llm_engine.worker.ranks[0].pid
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {pid}\) is gone \(its Ray actor died\)"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 30
        assert not llm.llm_engine.has_unfinished_requests()
    finally:
        llm.shutdown()
    assert process_gone(pid) and not torch.distributed.is_initialized()


def test_ray_data_example_with_two_actors(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    prompts = [f"Prompt number {i} says" for i in range(8)]
    with open(tmp_path / "in.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    ray_tmp = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=ROOT, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "examples", "ray_data_offline.py"),
        *("--model", path, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")),
        *("--num-actors", "2", "--num-cpus", "2", "--batch-size", "2", "--max-tokens", "6"),
        *("--max-model-len", "128", "--enforce-eager"),
    ]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        leftover = wait_gone(ray_tmp)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 prompts on" in done.stdout
    assert leftover == []
    rows = []
    for name in sorted(os.listdir(tmp_path / "out")):
        with open(tmp_path / "out" / name) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    got = {r["prompt"]: r["generated_text"] for r in rows}
    assert sorted(got) == sorted(prompts)
    with LLM(path, enforce_eager=True, max_model_len=128) as one:  # the oracle: one LLM here
        want = one.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert {o.prompt: o.outputs[0].text for o in want} == got
    # a pool of two actors (Ray Data may hand every batch of so small a job to the first one ready)
    assert 1 <= len({r["actor_pid"] for r in rows}) <= 2
