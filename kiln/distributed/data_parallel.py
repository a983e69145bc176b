"""Data parallelism on one host: ``LLM(data_parallel_size=N)`` is N engine replicas. Replica 0 is the
``LLM`` itself; replicas 1..N-1 each run an ``LLM`` (with ``data_parallel_size=1``, and the same
``tensor_parallel_size``, whose ranks they start themselves) in a process of their own (spawned; on CUDA
replica r sees the devices ``r*TP .. r*TP+TP-1`` of those this process sees), serving the first one's
messages from a pipe.

``generate`` and ``chat`` validate and tokenize every prompt in the ``LLM``'s process, split them into
N shards of about the same number of prompts and of prompt tokens (longest first, each to the shard with
the fewest tokens among those not yet full), run the shards at once and return the outputs in input
order, with request ids numbered by the first replica. ``collective_rpc`` / ``apply_model`` return every
replica's workers' results (replica-major), ``sleep`` / ``wake_up`` reach every replica; the other
methods (``beam_search``, ``enqueue``, ...) run on the first replica (pooling models are refused).

A replica that dies is reported (its pid and exit code) at the next call or while one waits for it;
a generation's shard is waited for as long as its replica lives, any other wait at most
``KILN_DISTRIBUTED_TIMEOUT``. ``shutdown`` (or the interpreter exiting)
stops the replicas, killing any that do not exit in time; a replica whose parent is gone exits.
"""

import dataclasses
import multiprocessing.util
import os
import pickle
import threading
import time
import traceback

import torch.multiprocessing as mp

from kiln import envs


class ReplicaError(RuntimeError):
    """A data-parallel replica died or failed."""


def shard(lengths: list[int], size: int) -> list[list[int]]:
    """Indices of each of ``size`` shards: counts differ by at most one, prompt tokens balanced
    greedily (longest prompt first, to the shard with the fewest tokens that still has room)."""
    n = len(lengths)
    room = [n // size + (1 if r < n % size else 0) for r in range(size)]
    tokens = [0] * size
    shards: list[list[int]] = [[] for _ in range(size)]
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        r = min((r for r in range(size) if len(shards[r]) < room[r]), key=lambda r: (tokens[r], r))
        shards[r].append(i)
        tokens[r] += lengths[i]
    return [sorted(s) for s in shards]


def add_with_ids(llm, ids: list[str], prepared: list[tuple]) -> None:
    """``prepared`` (``LLM._prepare``'s tuples) added to ``llm``'s engine under ``ids``."""
    engine = llm.llm_engine
    for lora in {p[3] for p in prepared if p[3] is not None}:
        engine.load_lora(lora)
    for request_id, (processed, params, prio, lora) in zip(ids, prepared):
        engine.add_request(
            request_id, processed.text, processed.token_ids, params, processed.cache_salt, prio, lora
        )


def _visible_devices() -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` names them."""
    import torch

    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is not None:
        return [n.strip() for n in names.split(",") if n.strip()]
    return [str(d) for d in range(torch.cuda.device_count())]


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)  # the first replica is gone: nobody reads this one's outputs


def _replica_main(replica: int, args, chat_template, devices: str | None, parent_pid: int, conn) -> None:
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    import torch

    from kiln.runtime.llm import LLM

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.data_parallel_size))
    try:
        llm = LLM.from_engine_args(dataclasses.replace(args, data_parallel_size=1), chat_template)
    except Exception as e:
        conn.send((0, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    conn.send((0, "ok", None))
    try:
        while True:
            seq, kind, *payload = conn.recv()
            if kind == "stop":
                break
            try:
                if kind == "generate":
                    ids, prepared = payload
                    add_with_ids(llm, ids, prepared)
                    value = llm._run_engine(ids, use_tqdm=False)
                else:
                    method, call_args = payload
                    value = getattr(llm, method)(*call_args)
                conn.send((seq, "ok", value))
            except Exception as e:
                conn.send((seq, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    except EOFError:  # the first replica is gone
        pass
    llm.shutdown()


def _stop(procs: list, conns: list, timeout: float = 10.0) -> None:
    for conn in conns:
        try:
            conn.send((-1, "stop"))
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


class DataParallelReplicas:
    """Replicas 1..N-1 of an ``LLM``; ``start`` returns None without data parallelism."""

    @classmethod
    def start(cls, args, chat_template) -> "DataParallelReplicas | None":
        return cls(args, chat_template) if args.data_parallel_size > 1 else None

    def __init__(self, args, chat_template):
        self.size = args.data_parallel_size
        self.timeout = envs.distributed_timeout()
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        self.seq = 0  # number of the last message; a reply to an earlier one (an interrupted call) is dropped
        # before the interpreter joins its children at exit (non-daemonic: replicas start rank processes)
        self._finalizer = multiprocessing.util.Finalize(
            self, _stop, args=(self.procs, self.conns), exitpriority=10
        )
        tp = args.tensor_parallel_size
        import torch

        visible = _visible_devices() if torch.cuda.is_available() else None
        for r in range(1, self.size):
            parent, child = ctx.Pipe()
            devices = ",".join(visible[r * tp : (r + 1) * tp]) if visible is not None else None
            proc = ctx.Process(
                target=_replica_main,
                args=(r, args, chat_template, devices, os.getpid(), child),
                name=f"kiln-dp-replica{r}",
                daemon=False,
            )
            try:
                proc.start()
            except Exception as e:
                self.shutdown()
                raise ValueError(f"data_parallel_size={self.size}: cannot start replica {r} ({e})") from e
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def wait_ready(self) -> None:
        for r in range(1, self.size):
            self._reply(r, seq=0)

    # ------------------------------------------------------------------ messages

    def check_alive(self) -> None:
        for r, proc in enumerate(self.procs, start=1):
            if proc.exitcode is not None:
                raise ReplicaError(
                    f"data-parallel replica {r} (pid {proc.pid}) exited with code {proc.exitcode}; "
                    "shut this LLM down and create a new one"
                )

    def _send(self, r: int, message: tuple) -> None:
        self.check_alive()
        try:
            data = pickle.dumps((self.seq, *message))
        except Exception as e:
            raise ValueError(
                f"data parallelism: {message[1]!r} cannot be sent to the other replicas ({e}); "
                "pass a method name or a module-level function"
            ) from e
        try:
            self.conns[r - 1].send_bytes(data)
        except OSError as e:
            self.check_alive()
            raise ReplicaError(f"data parallelism: cannot reach replica {r} ({e})") from e

    def _reply(self, r: int, bounded: bool = True, seq: int | None = None):
        """Replica ``r``'s reply; a generation's (``bounded=False``) is waited for as long as the
        replica lives, anything else for ``KILN_DISTRIBUTED_TIMEOUT`` at most."""
        conn, proc = self.conns[r - 1], self.procs[r - 1]
        seq = self.seq if seq is None else seq
        deadline = time.monotonic() + self.timeout
        while True:
            while not conn.poll(0.05):
                if proc.exitcode is not None:
                    self.check_alive()
                if bounded and time.monotonic() > deadline:
                    raise TimeoutError(f"data-parallel replica {r} did not reply within {self.timeout} s")
            try:
                got, status, value = conn.recv()
            except EOFError:
                proc.join(5)
                self.check_alive()
                raise
            if got == seq:
                break
        if status == "error":
            raise ReplicaError(f"data-parallel replica {r} failed: {value}")
        return value

    # ------------------------------------------------------------------ the LLM's calls

    def generate(self, llm, prepared: list[tuple], use_tqdm) -> list:
        """Every prompt of ``prepared`` (``LLM._prepare``'s) run on one of the replicas; the outputs
        in input order."""
        n = len(prepared)
        first = llm._request_counter
        llm._request_counter += n
        ids = [str(first + i) for i in range(n)]
        self.seq += 1
        shards = shard([len(p[0].token_ids) for p in prepared], self.size)
        for r in range(1, self.size):
            self._send(r, ("generate", [ids[i] for i in shards[r]], [prepared[i] for i in shards[r]]))
        local = [ids[i] for i in shards[0]]
        add_with_ids(llm, local, [prepared[i] for i in shards[0]])
        outputs = [None] * n
        for i, out in zip(shards[0], llm._run_engine(local, use_tqdm)):
            outputs[i] = out
        for r in range(1, self.size):
            for i, out in zip(shards[r], self._reply(r, bounded=False)):
                outputs[i] = out
        return outputs

    def call(self, method: str, args: tuple, local) -> list:
        """``LLM.<method>(*args)`` on replicas 1..N-1 and ``local()`` (the same on this one's engine)
        meanwhile; the results in replica order."""
        self.seq += 1
        for r in range(1, self.size):
            self._send(r, ("call", method, args))
        results = [local()]
        return results + [self._reply(r) for r in range(1, self.size)]

    def shutdown(self) -> None:
        self._finalizer()
