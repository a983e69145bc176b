"""The tensor-parallel group of this process: its rank and size, and the two collectives the model
uses (an all-reduce after the row-parallel projections, an all-gather of the vocabulary shards).

A process belongs to at most one group (``torch.distributed``'s default group), so one tensor-parallel
``LLM`` at a time; a model holds the ``TensorParallel`` it was built for (a one-rank model built
beside it never communicates).

The collectives go through ``torch.distributed``'s functional collectives on the group's name, so
Dynamo traces them into the graph (no graph break) and CUDA graphs capture them (NCCL). With one rank
both are the identity and no process group exists.
"""

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group_name: str = ""


ONE_RANK = TensorParallel()  # no tensor parallelism
_STATE = ONE_RANK


def get() -> TensorParallel:
    return _STATE


def free_port() -> int:
    """A free TCP port on the loopback interface (the ranks rendezvous on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, size: int, port: int, backend: str, timeout_s: float) -> None:
    """Join the group of ``size`` ranks on 127.0.0.1:``port`` (``backend``: "nccl" or "gloo")."""
    global _STATE
    if dist.is_initialized():
        raise RuntimeError(
            "tensor parallelism: this process already belongs to a process group "
            "(shut the other tensor-parallel LLM down first)"
        )
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _STATE = TensorParallel(rank, size, dist.group.WORLD.group_name)


def destroy() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ONE_RANK


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The sum over the ranks of ``x`` (row-parallel outputs, vocab-parallel embeddings)."""
    if tp.size == 1:
        return x
    return torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(x, "sum", tp.group_name)
    )


def all_gather_last_dim(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """``[n, d]`` per rank -> ``[n, size * d]``, rank 0's columns first (vocab-parallel logits)."""
    if tp.size == 1:
        return x
    n, d = x.shape
    gathered = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), tp.size, tp.group_name)
    )
    return gathered.view(tp.size, n, d).permute(1, 0, 2).reshape(n, tp.size * d)
