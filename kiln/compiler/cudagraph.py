"""CUDA graphs: one wrapper for full and piecewise graphs, dispatching on the forward context.

A ``CUDAGraphWrapper`` wraps a callable (the whole forward for ``"full"`` graphs, one compiled piece of
the split graph for ``"piecewise"`` ones). When the forward context's ``graph_mode`` is the wrapper's
mode it replays its graph for the context's ``num_tokens`` (capturing it first when the context says
``capturing``); otherwise it simply calls what it wraps. The compiler's backend installs the piecewise
wrappers while it builds the split graph; the worker wraps the forward in the full one. Inside a full
graph the piecewise wrappers therefore run their pieces directly, and inside a piecewise step the full
wrapper passes through.

``CudaGraphs`` holds the capture sizes, the one memory pool every graph shares and the wrappers, and
picks each step's mode and bucket:

- full graphs serve pure-decode steps (one token per sequence), padded up to a bucket of sequences;
  their inputs and attention metadata live in fixed-address buffers, padding rows store nothing;
- piecewise graphs serve prefill and mixed batches, padded up to a bucket of tokens; attention runs
  eagerly between the replayed pieces, on the pieces' fixed-address outputs.
"""

import bisect

import torch

from kiln.ops.forward_context import get_forward_context


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, every 8 up to 256, every 32 up to 512, then every 64, capped at ``max_num_seqs``,
    which is always one (the largest batch the scheduler makes). Above 256 rows a step's GEMMs cost
    about the same for any row count within a 64-row tile: coarser steps there lose little and save
    capture time."""
    top = max_num_seqs + 1
    ladder = [1, 2, 4, *range(8, 256, 8), *range(256, min(top, 512), 32), *range(512, top, 64)]
    sizes = [s for s in ladder if s <= max_num_seqs]  # ascending, no repeats
    if not sizes or sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def _weak_ref(value):
    """A tensor aliasing ``value``'s memory without owning it (so the graph pool can reuse it once the
    capture run is over; each replay rewrites it in the same order)."""
    if not isinstance(value, torch.Tensor):
        return value
    storage = value.untyped_storage()
    alias = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), value.device, storage.nbytes())
    return torch.empty((), dtype=value.dtype, device=value.device).set_(
        alias, value.storage_offset(), value.shape, value.stride()
    )


class CUDAGraphWrapper(torch.nn.Module):
    """Replays one CUDA graph per token count of a callable, in the steps whose mode is ``mode``."""

    def __init__(self, runnable, mode: str, graphs: "CudaGraphs"):
        super().__init__()
        object.__setattr__(self, "runnable", runnable)  # a compiled piece or the forward, not a submodule
        self.mode, self.owner = mode, graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, object] = {}
        self.replays = 0

    def forward(self, *args):
        ctx = get_forward_context()
        if ctx.graph_mode != self.mode:
            return self.runnable(*args)
        size = ctx.num_tokens
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
            self.replays += 1
            return self.outputs[size]
        if not ctx.capturing:
            return self.runnable(*args)
        if not self.graphs:  # the first capture: lazy initialisation and autotuning run outside it
            self.runnable(*args)
        graph = torch.cuda.CUDAGraph()
        out = self.owner.capture(graph, self.runnable, args)
        self.graphs[size] = graph
        # a piece's outputs are the next piece's inputs, rewritten by every replay; the full graph's
        # output is what the step returns, so it keeps its memory
        self.outputs[size] = torch.utils._pytree.tree_map(_weak_ref, out) if self.mode == "piecewise" else out
        return out

    def reset(self) -> None:
        self.graphs.clear()
        self.outputs.clear()


class CudaGraphs:
    """The capture plan, the shared memory pool and every wrapper of one engine."""

    def __init__(self, full_sizes=(), piecewise_sizes=()):
        self.full_sizes = sorted(full_sizes)
        self.piecewise_sizes = sorted(piecewise_sizes)
        self.wrappers: list[CUDAGraphWrapper] = []
        self._pool = None
        self._stream = None  # the capture stream
        self.ready = False  # every planned graph is captured: steps may be dispatched to them

    @property
    def enabled(self) -> bool:
        return bool(self.full_sizes or self.piecewise_sizes)

    def pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def capture(self, graph: torch.cuda.CUDAGraph, fn, args):
        """``fn(*args)`` captured into ``graph`` on a side stream, in the shared pool. Unlike
        ``torch.cuda.graph`` this neither synchronises the device nor empties the allocator's cache for
        each graph (a piecewise size captures one graph per piece, each emptying cost a free and a new
        allocation of every block the next piece needs); the worker empties it once after capture."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            graph.capture_begin(pool=self.pool(), capture_error_mode="global")
            try:
                out = fn(*args)
            finally:
                graph.capture_end()
        current.wait_stream(self._stream)
        return out

    def wrap(self, runnable, mode: str):
        """``runnable`` wrapped for ``mode`` graphs, or as is when no size of that mode is planned."""
        if not (self.full_sizes if mode == "full" else self.piecewise_sizes):
            return runnable
        wrapper = CUDAGraphWrapper(runnable, mode, self)
        self.wrappers.append(wrapper)
        return wrapper

    @staticmethod
    def _bucket(sizes: list[int], n: int) -> int | None:
        i = bisect.bisect_left(sizes, n)
        return sizes[i] if i < len(sizes) else None

    def dispatch(self, num_tokens: int, num_seqs: int, pure_decode: bool) -> tuple[str, int]:
        """(graph mode, padded size) of a step: size counts sequences for full graphs, tokens otherwise."""
        if not self.ready:
            return "none", num_tokens
        if pure_decode and self.full_sizes and num_seqs <= self.full_sizes[-1]:
            return "full", self._bucket(self.full_sizes, num_seqs)
        if self.piecewise_sizes and num_tokens <= self.piecewise_sizes[-1]:
            return "piecewise", self._bucket(self.piecewise_sizes, num_tokens)
        return "none", num_tokens

    def captured(self, mode: str) -> list[int]:
        """Sizes with a captured graph in every wrapper of ``mode`` (empty when there is none)."""
        sets = [set(w.graphs) for w in self.wrappers if w.mode == mode]
        return sorted(set.intersection(*sets)) if sets else []

    def replays(self, mode: str) -> int:
        """Steps that replayed ``mode`` graphs (a piecewise step replays every piece once)."""
        counts = [w.replays for w in self.wrappers if w.mode == mode]
        return max(counts) if counts else 0

    def reset(self) -> None:
        """Drop every graph and the pool (their memory returns once the allocator's cache is emptied)."""
        for w in self.wrappers:
            w.reset()
        self._pool = None
        self.ready = False
