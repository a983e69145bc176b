"""What a tensor-parallel rank beyond 0 does, whichever way it runs (a spawned process, ``mp_rank``, or a
Ray actor, ``ray_rank``): join the group, build its ``Worker``, then handle rank 0's messages.

Messages (pickled tuples): ``("execute", SchedulerOutput)`` and ``("deferred", GrammarBitmask)`` run a
step's part on this rank and send nothing back; ``("call", method, args, kwargs)`` runs a Worker method
(by name) or ``method(worker, ...)`` and replies ``("ok", value)`` or ``("error", text)``; ``("stop",)``
ends the rank. A step that fails leaves this rank out of step with the others, so it ends the rank
(rank 0 then sees it gone).
"""

import os
import traceback

import torch

from kiln import envs
from kiln.distributed import parallel_state
from kiln.runtime.config import EngineConfig
from kiln.runtime.worker import Worker


def backend_for(config: EngineConfig) -> str:
    return "nccl" if config.device.type == "cuda" else "gloo"


def call(worker: Worker, method, args, kwargs):
    fn = getattr(worker, method) if isinstance(method, str) else (lambda *a, **k: method(worker, *a, **k))
    return fn(*args, **kwargs)


def start_rank(rank: int, size: int, port: int, config: EngineConfig, model_config) -> Worker:
    """This process's device and threads, its place in the group, its Worker."""
    if config.device.type == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    parallel_state.init(rank, size, port, backend_for(config), envs.distributed_timeout())
    return Worker(config, model_config)


def handle(worker: Worker, message: tuple):
    """Run one message; the reply for a call, None for a step's part."""
    kind, *payload = message
    if kind in ("execute", "deferred"):
        try:
            if kind == "execute":
                worker.execute_model(payload[0])
            else:
                worker.sample_deferred(payload[0])
        except BaseException:
            traceback.print_exc()
            os._exit(1)  # out of step with the other ranks: rank 0 reports this rank gone
        return None
    try:
        return ("ok", call(worker, *payload))
    except Exception as e:  # reported to rank 0, which raises it
        return ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def stop_rank(worker: Worker | None) -> None:
    if worker is not None:
        worker.shutdown()
    parallel_state.destroy()
