"""CUDA graphs per batch-size bucket, all sharing one memory pool.

Full graphs (``DecodeGraphs``) serve pure-decode steps; piecewise graphs (``PiecewiseGraphs``) serve
prefill and mixed batches, replaying each compiled piece between eagerly run attention ops.

Full graphs for pure-decode steps: one graph per batch-size bucket.

A decode step (one new token per sequence) is padded up to the nearest bucket and replayed from a
graph captured with the whole forward inside, attention included. Inputs and attention metadata live
in fixed-address buffers sized for the largest bucket; padding rows get slot -1 (nothing stored) and a
context of one token, and their outputs are dropped. The attention kernels' launch configuration
depends only on tensor shapes in decode, so one capture serves every context length that fits the
block table.
"""

import bisect
from contextlib import contextmanager

import torch

from kiln.compiler.piecewise import CompiledPiece
from kiln.ops.forward_context import forward_context
from kiln.ops.metadata import AttentionMetadata


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every 8 up to 256, then every 16, capped at ``max_num_seqs``."""
    ladder = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max(max_num_seqs, 256) + 1, 16))
    sizes = [s for s in ladder if s <= max_num_seqs]
    if not sizes or sizes[-1] < max_num_seqs <= 512:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class _Buckets:
    """A ladder of capture sizes; a batch runs in the smallest bucket that holds it."""

    sizes: list[int]

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, n: int) -> int | None:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None


class DecodeGraphs(_Buckets):
    def __init__(
        self,
        forward_fn,
        kv_caches: list[torch.Tensor],
        capture_sizes: list[int],
        max_blocks_per_seq: int,
        device: torch.device,
        attention_backend: str,
        pool=None,
    ):
        self.forward_fn = forward_fn
        self.kv_caches = kv_caches
        self.sizes = sorted(capture_sizes)
        self.backend = attention_backend
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.max_seq_len = max_blocks_per_seq * kv_caches[0].shape[2]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )

    def _forward(self, size: int) -> torch.Tensor:
        with forward_context(self._metadata(size), self.kv_caches, self.backend):
            return self.forward_fn(self.input_ids[:size], self.positions[:size])

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        """Capture every bucket, largest first (later, smaller graphs reuse the pool's memory)."""
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: lazy initialisation and autotuning outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
            if progress is not None:
                progress.update(1)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, input_ids, positions, slot_mapping, seq_lens, block_tables) -> torch.Tensor:
        """Replay the bucket for ``len(input_ids)`` sequences; inputs are device tensors of the step."""
        n = input_ids.shape[0]
        size = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.seq_lens[:n].copy_(seq_lens)
        width = block_tables.shape[1]
        self.block_tables[:n, :width].copy_(block_tables)
        if size > n:  # padding rows: store nothing, attend to one slot
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][:n]


# ---------------------------------------------------------------------------------------- piecewise

_active_size: int | None = None  # bucket whose piece graphs replay (or are captured) right now
_capturing = False


@contextmanager
def piecewise_size(size: int, capture: bool = False):
    """Within this context every ``GraphedPiece`` replays (or captures) its graph for ``size`` tokens."""
    global _active_size, _capturing
    saved = _active_size, _capturing
    _active_size, _capturing = size, capture
    try:
        yield
    finally:
        _active_size, _capturing = saved


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


class GraphedPiece(torch.nn.Module):
    """A compiled piece that replays one CUDA graph per token bucket; runs the piece as is otherwise.

    Between pieces the attention op runs eagerly on the pieces' (fixed-address) output buffers.
    """

    def __init__(self, piece: torch.nn.Module, pool):
        super().__init__()
        self.piece, self.pool = piece, pool
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, object] = {}

    def forward(self, *args):
        size = _active_size
        if size is None:
            return self.piece(*args)
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
            return self.outputs[size]
        if not _capturing:
            return self.piece(*args)
        self.piece(*args)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.piece(*args)
        self.graphs[size] = graph
        self.outputs[size] = torch.utils._pytree.tree_map(_weak_ref, out)
        return out


class PiecewiseGraphs(_Buckets):
    """Piecewise CUDA graphs for batches that are not pure decode (prefill chunks, mixed batches).

    The token batch is padded up to the nearest bucket: padding tokens get slot -1 and belong to no
    sequence, so attention ignores them; their rows are dropped from the output.
    """

    def __init__(self, forward_fn, split_module, kv_caches, capture_sizes, block_size, device, backend, pool):
        self.forward_fn, self.kv_caches, self.backend = forward_fn, kv_caches, backend
        self.sizes = sorted(capture_sizes)
        self.block_size, self.device = block_size, device
        self.pieces = []
        for name, module in list(split_module.named_children()):
            if isinstance(module, CompiledPiece):
                graphed = GraphedPiece(module, pool)
                setattr(split_module, name, graphed)
                self.pieces.append(graphed)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.replays = 0

    @torch.inference_mode()
    def capture(self, progress=None) -> None:
        """Capture every bucket, largest first, on a dummy batch that stores nothing."""
        dev = self.device
        for size in reversed(self.sizes):
            md = AttentionMetadata.single_sequence(size, self.block_size, dev, store=False)
            with forward_context(md, self.kv_caches, self.backend), piecewise_size(size, capture=True):
                self.forward_fn(self.input_ids[:size], self.positions[:size])
            if progress is not None:
                progress.update(1)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        size = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        slots = md.slot_mapping
        if size > n:
            slots = torch.cat([slots, slots.new_full((size - n,), -1)])
        padded = AttentionMetadata(
            slots, md.query_start_loc, md.seq_lens, md.block_tables, md.max_query_len, md.max_seq_len
        )
        self.replays += 1
        with forward_context(padded, self.kv_caches, self.backend), piecewise_size(size):
            return self.forward_fn(self.input_ids[:size], self.positions[:size])[:n]
