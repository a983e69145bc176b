"""Tensor-parallel ranks as processes: rank 0's ``Worker`` runs in the engine's process, every other
rank's in a process of its own (``torch.multiprocessing`` spawn), all in one process group on
127.0.0.1 (NCCL on CUDA, gloo on CPU).

``TensorParallelWorkers`` has the ``Worker``'s interface, so the engine drives it the same way: each
start-up step and control call goes to every rank and waits for their replies, and each step's
``SchedulerOutput`` is pickled down a pipe to every other rank before rank 0 runs it. Every rank runs
the same forward and the same sampling on the same gathered logits (so each holds the sampled tokens
a next step's pending inputs come from); only rank 0's ``RunnerOutput`` is used. A step travels without
the prompt and output token lists of sequences that need neither penalties nor prompt logprobs
(``benchmarks/tp_step_broadcast.py`` measures the cost per step).

A rank that dies is noticed before the next step or call (its exit code), while rank 0 waits for a
reply (polling its liveness) and when a collective fails; ``KILN_DISTRIBUTED_TIMEOUT`` bounds every
wait. ``shutdown`` stops the processes, killing any that do not exit in time.
"""

import copy
import logging
import os
import pickle
import time
import traceback
import weakref
from dataclasses import replace

import torch
import torch.multiprocessing as mp

from kiln import envs
from kiln.distributed import parallel_state
from kiln.runtime.config import EngineConfig
from kiln.runtime.step_data import SchedulerOutput
from kiln.runtime.worker import Worker

logger = logging.getLogger("kiln")


class RankError(RuntimeError):
    """A tensor-parallel rank died or failed."""


def make_worker(config: EngineConfig, model_config):
    """The engine's worker: a ``Worker``, or one per rank behind ``TensorParallelWorkers``."""
    if config.tensor_parallel_size == 1:
        return Worker(config, model_config)
    return TensorParallelWorkers(config, model_config)


def _needs_token_lists(s) -> bool:
    """The sampler reads a sequence's prompt and output tokens only for penalties, the runner its
    prompt only for prompt logprobs."""
    p = s.params
    penalties = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    return penalties or s.prompt_logprobs is not None


def step_message(scheduler_output: SchedulerOutput) -> tuple:
    """What the other ranks get of a step: the step without the token lists they do not read (the
    prompt and output of every sequence would otherwise travel every step)."""
    scheduled = []
    for s in scheduler_output.scheduled:
        if not _needs_token_lists(s):
            s = copy.copy(s)
            s.prompt_token_ids = s.output_token_ids = []
        scheduled.append(s)
    return ("execute", replace(scheduler_output, scheduled=scheduled))


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.device.type == "cuda" else "gloo"


def _call(worker: Worker, method, args, kwargs):
    fn = getattr(worker, method) if isinstance(method, str) else (lambda *a, **k: method(worker, *a, **k))
    return fn(*args, **kwargs)


def _rank_main(rank: int, size: int, port: int, config: EngineConfig, model_config, conn) -> None:
    """A rank beyond 0: join the group, then serve rank 0's messages until "stop" or its pipe closes."""
    try:
        if config.device.type == "cuda":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        parallel_state.init(rank, size, port, _backend(config), envs.distributed_timeout())
        worker = Worker(config, model_config)
        while True:
            kind, *payload = conn.recv()
            if kind == "stop":
                break
            if kind == "execute":
                worker.execute_model(payload[0])
                continue
            if kind == "deferred":
                worker.sample_deferred(payload[0])
                continue
            try:
                conn.send(("ok", _call(worker, *payload)))
            except Exception as e:  # reported to rank 0, which raises it
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        worker.shutdown()
        parallel_state.destroy()
    except EOFError:  # rank 0 is gone
        pass


def _stop(procs: list, conns: list, timeout: float = 10.0) -> None:
    """Ask every rank to exit, then kill the ones still running after ``timeout``."""
    for conn in conns:
        try:
            conn.send(("stop",))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    for conn in conns:
        conn.close()
    parallel_state.destroy()


class TensorParallelWorkers:
    def __init__(self, config: EngineConfig, model_config):
        size = config.tensor_parallel_size
        model_config = getattr(model_config, "arch", model_config)  # the plain ModelConfig of a view
        self.world_size = size
        self.timeout = envs.distributed_timeout()
        port = parallel_state.free_port()
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_main,
                args=(rank, size, port, config, model_config, child),
                name=f"kiln-tp-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        try:
            parallel_state.init(0, size, port, _backend(config), self.timeout)
            self.local = Worker(config, model_config)
        except BaseException:
            self.shutdown()
            raise

    def __getattr__(self, name):  # model, runner, kv_caches, num_blocks, asleep, ...: rank 0's
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    # ------------------------------------------------------------------ messages

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.exitcode is not None:
                raise RankError(
                    f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}; "
                    "shut this LLM down and create a new one"
                )

    def _send(self, message: tuple) -> None:
        self.check_alive()
        try:
            data = pickle.dumps(message)
        except Exception as e:
            raise ValueError(
                f"collective_rpc: {message[1]!r} cannot be sent to the other ranks ({e}); "
                "pass a method name or a module-level function"
            ) from e
        for conn in self.conns:
            try:
                conn.send_bytes(data)
            except OSError as e:
                self.check_alive()
                raise RankError(f"tensor parallelism: cannot reach a rank ({e})") from e

    def _reply(self, rank: int, timeout: float):
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.05):
            if proc.exitcode is not None:
                self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel rank {rank} did not reply within {timeout} s")
        status, value = conn.recv()
        if status == "error":
            raise RankError(f"tensor-parallel rank {rank} failed: {value}")
        return value

    def _run_local(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            self.check_alive()  # a collective that failed because a rank died says so
            raise e

    def call_all(self, method, args: tuple = (), kwargs: dict | None = None, timeout: float | None = None):
        """``method`` (a Worker method name, or a callable taking the worker first) on every rank,
        rank 0 last to start; the list of results in rank order."""
        kwargs = kwargs or {}
        self._send(("call", method, args, kwargs))
        local = self._run_local(_call, self.local, method, args, kwargs)
        timeout = self.timeout if timeout is None else timeout
        return [local, *(self._reply(rank, timeout) for rank in range(1, self.world_size))]

    # ------------------------------------------------------------------ the Worker's interface

    def load_model(self) -> None:
        self.call_all("load_model")

    def compile_and_warm_up(self) -> None:
        self.call_all("compile_and_warm_up")

    def determine_kv_budget(self) -> int:
        return min(self.call_all("determine_kv_budget"))

    def kv_bytes_per_block(self) -> int:
        return self.local.kv_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int, config: EngineConfig | None = None) -> None:
        self.call_all("initialize_kv_cache", (num_blocks, config))

    def capture_graphs(self) -> None:
        self.call_all("capture_graphs")

    def execute_model(self, scheduler_output):
        self._send(step_message(scheduler_output))
        return self._run_local(self.local.execute_model, scheduler_output)

    def sample_deferred(self, grammar_bitmask) -> None:
        self._send(("deferred", grammar_bitmask))
        self._run_local(self.local.sample_deferred, grammar_bitmask)

    def sleep(self, level: int = 1) -> None:
        self.call_all("sleep", (level,))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.call_all("wake_up", (tags,))

    def compile_report(self):
        return self.local.compile_report()

    def shutdown(self) -> None:
        if "local" in self.__dict__:
            self.local.shutdown()
        self._finalizer()  # stops the processes once; later calls do nothing
