"""A tensor-parallel rank as a Ray actor (``distributed_executor_backend="ray"``).

Rank 0 stays in the ``LLM``'s process; every other rank is an actor pinned to rank 0's node (the group
meets on 127.0.0.1), holding one CPU-less slot (one GPU on CUDA, with Ray leaving
``CUDA_VISIBLE_DEVICES`` as rank 0 sees it, so rank r uses device r). Messages are the pickled tuples of
``rank_server``, one actor call each; an actor runs its calls in the order they were made. Kiln
connects to the cluster ``ray.init()`` finds (``RAY_ADDRESS``) or starts a local one, which it shuts
down again with the last of its ranks.
"""

import collections
import os
import pickle
import sys
import time

from kiln.distributed import rank_server

_started_ray = [0]  # live ranks of the Ray instance kiln started (0: none, or the user's)


class _RankActor:
    def __init__(self):
        self.worker = None

    def pid(self) -> int:
        return os.getpid()

    def start(self, rank, size, port, config, model_config) -> None:
        self.worker = rank_server.start_rank(rank, size, port, config, model_config)

    def handle(self, data: bytes):
        return rank_server.handle(self.worker, pickle.loads(data))

    def stop(self) -> None:
        rank_server.stop_rank(self.worker)


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ValueError(
            "distributed_executor_backend='ray' needs Ray: pip install 'ray[data]' (or kiln's ray extra)"
        ) from e
    return ray


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


class RayRank:
    def __init__(self, rank: int, size: int, port: int, config, model_config, timeout: float):
        ray = self.ray = _ray()
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
            _started_ray[0] = 1
        elif _started_ray[0]:
            _started_ray[0] += 1
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.rank = rank
        # rank 0's import path (the functions collective_rpc sends are pickled by reference)
        env = {
            "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        }
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        here = ray.get_runtime_context().get_node_id()
        self.actor = (
            ray.remote(_RankActor)
            .options(
                num_cpus=0,
                num_gpus=1 if config.device.type == "cuda" else 0,
                max_concurrency=1,
                max_restarts=0,
                runtime_env={"env_vars": env},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
            )
            .remote()
        )
        self.replies = collections.deque()  # calls whose replies are still to be read
        try:
            self.pid = ray.get(self.actor.pid.remote(), timeout=timeout)
        except Exception as e:
            self._kill()
            raise RuntimeError(f"tensor-parallel rank {rank}: its Ray actor did not start ({e})") from e
        self.started = self.actor.start.remote(rank, size, port, config, model_config)

    def send(self, data: bytes, reply: bool) -> None:
        ref = self.actor.handle.remote(data)
        if reply:
            self.replies.append(ref)

    def poll(self, timeout: float) -> bool:
        ready, _ = self.ray.wait([self.replies[0]], timeout=timeout)
        return bool(ready)

    def recv(self):
        try:
            return self.ray.get(self.replies.popleft())
        except self.ray.exceptions.RayActorError as e:
            raise EOFError(f"tensor-parallel rank {self.rank}'s Ray actor died ({e})") from e

    def exit_reason(self) -> str | None:
        return "is gone (its Ray actor died)" if _process_gone(self.pid) else None

    def wait_started(self, timeout: float) -> None:
        """Rank 0 has joined the group: the actor's ``start`` must end too."""
        deadline = time.monotonic() + timeout
        while True:
            ready, _ = self.ray.wait([self.started], timeout=0.05)
            if ready:
                self.ray.get(self.started)
                return
            if self.exit_reason() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {self.rank} (pid {self.pid}) did not start")

    def stop(self, deadline: float) -> None:
        if self.exit_reason() is None:
            try:
                ref = self.actor.stop.remote()
                self.ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
        self._kill()

    def _kill(self) -> None:
        ray = self.ray
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            pass
        pid = getattr(self, "pid", None)
        end = time.monotonic() + 10
        while pid is not None and not _process_gone(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if _started_ray[0]:
            _started_ray[0] -= 1
            if _started_ray[0] == 0 and ray.is_initialized():
                ray.shutdown()
