"""Tensor-parallel ranks: rank 0's ``Worker`` runs in the engine's process, every other rank's in a
process of its own (``mp_rank``: ``torch.multiprocessing`` spawn, the default) or a Ray actor
(``ray_rank``: ``distributed_executor_backend="ray"``), all in one process group on 127.0.0.1 (NCCL on
CUDA, gloo on CPU). What a rank does with a message is ``rank_server``'s.

``TensorParallelWorkers`` has the ``Worker``'s interface, so the engine drives it the same way: each
start-up step and control call goes to every rank and waits for their replies, and each step's
``SchedulerOutput`` is pickled to every other rank before rank 0 runs it. Every rank runs the same
forward and the same sampling on the same gathered logits (so each holds the sampled tokens a next
step's pending inputs come from); only rank 0's ``RunnerOutput`` is used. A step travels without the
prompt and output token lists of sequences that need neither penalties nor prompt logprobs
(``benchmarks/tp_step_broadcast.py`` measures the cost per step).

A rank that dies is noticed before the next step or call, while rank 0 waits for a reply (polling its
liveness) and when a collective fails; ``KILN_DISTRIBUTED_TIMEOUT`` bounds every wait. ``shutdown``
stops the ranks, killing any that do not exit in time.
"""

import copy
import logging
import pickle
import time
import weakref
from dataclasses import replace

from kiln import envs
from kiln.distributed import parallel_state, rank_server
from kiln.distributed.mp_rank import ProcessRank
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


def _stop(ranks: list, timeout: float = 10.0) -> None:
    """Ask every rank to exit, then kill the ones still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    for rank in ranks:
        rank.stop(deadline)
    parallel_state.destroy()


class TensorParallelWorkers:
    def __init__(self, config: EngineConfig, model_config):
        size = config.tensor_parallel_size
        model_config = getattr(model_config, "arch", model_config)  # the plain ModelConfig of a view
        self.world_size = size
        self.timeout = envs.distributed_timeout()
        port = parallel_state.free_port()
        self.ranks = []
        self._finalizer = weakref.finalize(self, _stop, self.ranks)
        try:
            for rank in range(1, size):
                if config.distributed_executor_backend == "ray":
                    from kiln.distributed.ray_rank import RayRank

                    self.ranks.append(RayRank(rank, size, port, config, model_config, self.timeout))
                else:
                    self.ranks.append(ProcessRank(rank, size, port, config, model_config))
            parallel_state.init(0, size, port, rank_server.backend_for(config), self.timeout)
            for rank in self.ranks:
                if hasattr(rank, "wait_started"):
                    rank.wait_started(self.timeout)
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
        for rank in self.ranks:
            reason = rank.exit_reason()
            if reason is not None:
                raise RankError(
                    f"tensor-parallel rank {rank.rank} (pid {rank.pid}) {reason}; "
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
        for rank in self.ranks:
            try:
                rank.send(data, reply=message[0] == "call")
            except OSError as e:
                self.check_alive()
                raise RankError(f"tensor parallelism: cannot reach a rank ({e})") from e

    def _reply(self, rank: int, timeout: float):
        handle = self.ranks[rank - 1]
        deadline = time.monotonic() + timeout
        while not handle.poll(0.05):
            if handle.exit_reason() is not None:
                self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel rank {rank} did not reply within {timeout} s")
        try:
            status, value = handle.recv()
        except EOFError:
            self.check_alive()
            raise
        if status == "error":
            raise RankError(f"tensor-parallel rank {rank} failed: {value}")
        return value

    def _run_local(self, fn, *args):
        try:
            return fn(*args)
        except Exception:
            # a collective that failed because a rank died says so; the peer's socket closes a
            # moment before its process shows as exited
            end = time.monotonic() + 2.0
            while True:
                self.check_alive()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def call_all(self, method, args: tuple = (), kwargs: dict | None = None, timeout: float | None = None):
        """``method`` (a Worker method name, or a callable taking the worker first) on every rank,
        rank 0 last to start; the list of results in rank order."""
        kwargs = kwargs or {}
        self._send(("call", method, args, kwargs))
        local = self._run_local(rank_server.call, self.local, method, args, kwargs)
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
