"""Checkpoint tensors copied into their parameters on several threads.

``copy_into(dest, src)`` is how a model's ``load_weights`` writes a tensor (or one shard of a fused
one) into its parameter: straight into the final layout, one copy. Inside ``parallel_copies(...)`` the
copies are handed to a thread pool (torch's copies release the GIL) and all finish before the ``with``
block ends; outside it they run at once. Copies to a CUDA device go through pinned staging buffers, one
pair per thread, in chunks on each thread's own stream, so reading the mapped file overlaps the
transfers and the driver never stages pageable memory itself.
"""

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

CHUNK_BYTES = 32 * 2**20  # staging-buffer size per copy step on CUDA
DEFAULT_THREADS = 8

_active: contextvars.ContextVar["_ParallelCopies | None"] = contextvars.ContextVar(
    "kiln_copies", default=None
)


def copy_into(dest: torch.Tensor, src: torch.Tensor) -> None:
    copies = _active.get()
    if copies is None:
        dest.copy_(src)
    else:
        copies.submit(dest, src)


def default_threads() -> int:
    return max(1, min(DEFAULT_THREADS, os.cpu_count() or 1))


@contextmanager
def parallel_copies(device: torch.device, threads: int | None = None):
    """Run the ``copy_into`` calls of the block on ``threads`` threads; wait for all of them at the end
    (the first copy error is raised there)."""
    threads = default_threads() if threads is None else threads
    if threads <= 1:
        yield
        return
    copies = _ParallelCopies(torch.device(device), threads)
    token = _active.set(copies)
    try:
        yield
    except BaseException:
        copies.close(raise_errors=False)
        raise
    else:
        copies.close(raise_errors=True)
    finally:
        _active.reset(token)


class _ParallelCopies:
    def __init__(self, device: torch.device, threads: int):
        self.device = device
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="kiln-weights")
        self.futures = []
        self.local = threading.local()  # per thread: stream, two pinned buffers and their events

    def submit(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        self.futures.append(self.pool.submit(self._copy, dest, src))

    def _copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        staged = (
            dest.is_cuda
            and not src.is_cuda
            and dest.dtype == src.dtype
            and dest.is_contiguous()
            and src.is_contiguous()
        )
        if not staged:
            dest.copy_(src)
            return
        state = self._staging()
        out, inp = dest.view(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
        with torch.cuda.stream(state.stream):
            for i, offset in enumerate(range(0, inp.numel(), CHUNK_BYTES)):
                n = min(CHUNK_BYTES, inp.numel() - offset)
                slot = (state.turn + i) % 2
                state.events[slot].synchronize()  # its previous transfer has left the buffer
                buf = state.buffers[slot][:n]
                buf.copy_(inp[offset : offset + n])
                out[offset : offset + n].copy_(buf, non_blocking=True)
                state.events[slot].record(state.stream)
            state.turn += 1

    def _staging(self):
        state = self.local
        if not hasattr(state, "stream"):
            state.stream = torch.cuda.Stream(self.device)
            state.buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            state.events = [torch.cuda.Event(), torch.cuda.Event()]
            for event in state.events:
                event.record(state.stream)
            state.turn = 0
        return state

    def close(self, raise_errors: bool) -> None:
        error = None
        for future in self.futures:
            e = future.exception()
            if e is not None and error is None:
                error = e
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # every thread's stream: the staging buffers are free
        self.pool.shutdown(wait=True)
        if error is not None and raise_errors:
            raise error
