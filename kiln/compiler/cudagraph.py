"""Full CUDA graphs for pure-decode steps: one graph per batch-size bucket, sharing one memory pool.

A decode step (one new token per sequence) is padded up to the nearest bucket and replayed from a
graph captured with the whole forward inside, attention included. Inputs and attention metadata live
in fixed-address buffers sized for the largest bucket; padding rows get slot -1 (nothing stored) and a
context of one token, and their outputs are dropped. The attention kernels' launch configuration
depends only on tensor shapes in decode, so one capture serves every context length that fits the
block table.
"""

import bisect

import torch

from kiln.ops.forward_context import forward_context
from kiln.ops.metadata import AttentionMetadata


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every 8 up to 256, then every 16, capped at ``max_num_seqs``."""
    ladder = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max(max_num_seqs, 256) + 1, 16))
    sizes = [s for s in ladder if s <= max_num_seqs]
    if not sizes or sizes[-1] < max_num_seqs <= 512:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(
        self,
        forward_fn,
        kv_caches: list[torch.Tensor],
        capture_sizes: list[int],
        max_blocks_per_seq: int,
        hidden_size: int,
        dtype: torch.dtype,
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

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

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
        return self.outputs[size][:n]
