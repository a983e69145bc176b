"""Attention backends: what ``kiln::attention`` runs, and every ``AttentionMetadata`` a step needs.

A backend builds its metadata for each kind of forward: real steps (``build``, one pinned copy shared
with the runner's other int64 inputs), dummy runs (``dummy``: compile, profiling, piecewise capture),
warm-ups (``warmup_steps``: one launch of every kernel variant) and full CUDA graphs
(``graph_metadata``: fixed-address buffers, padding rows that store nothing). ``supports_cuda_graphs``
tells the compilation plan whether graphs may be captured around it.

- ``torch``: the pure-torch reference (``kiln.ops.attention_ref``); it reads lengths back to the host,
  so it cannot run inside a CUDA graph.
- ``triton``: the Triton kernels (``kiln.ops.triton_attention``); no host sync, launch sizes that
  depend on shapes only, so full and piecewise graphs replay it.
"""

import torch

from kiln.ops.metadata import AttentionMetadata
from kiln.runtime.transfer import sections_to_device


class AttentionBackend:
    name = ""
    supports_cuda_graphs = False

    def __init__(self, block_size: int = 16, device: torch.device | str = "cpu"):
        self.block_size, self.device = block_size, torch.device(device)
        self._graph: dict[str, torch.Tensor] | None = None  # fixed buffers of full CUDA graphs

    # ------------------------------------------------------------------ the op

    def forward(
        self, q, k, v, out, kv_cache, md: AttentionMetadata, scale: float, sliding_window: int,
        k_scale: float = 1.0, v_scale: float = 1.0,
    ):  # fmt: skip
        """Store this step's K/V into ``kv_cache`` and write attention output into ``out`` (an fp8 cache
        holds K / k_scale and V / v_scale)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ metadata

    def build(
        self,
        slots: list[int],
        query_starts: list[int],
        seq_lens: list[int],
        block_table: list[int],
        max_query_len: int,
        long_sections: list[list[int]] = (),
    ) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """Metadata of a real step from host lists (``block_table`` flattened, rows padded to one
        width). ``long_sections`` (the runner's other int64 inputs) travel in the same copy and come
        back as device tensors, in order."""
        longs = sections_to_device([slots, *long_sections], self.device, torch.long)
        starts_t, lens_t, table_t = sections_to_device(
            [query_starts, seq_lens, block_table], self.device, torch.int32
        )
        num_seqs = len(seq_lens)
        md = AttentionMetadata(
            slot_mapping=longs[0],
            query_start_loc=starts_t,
            seq_lens=lens_t,
            block_tables=table_t.view(num_seqs, len(block_table) // max(1, num_seqs)),
            max_query_len=max_query_len,
            max_seq_len=max(seq_lens),
        )
        return md, longs[1:]

    def dummy(self, num_tokens: int, store: bool = False) -> AttentionMetadata:
        """One sequence prefilling ``num_tokens`` tokens; without ``store`` nothing is written and a
        cache of one block serves it (see ``AttentionMetadata.single_sequence``)."""
        return AttentionMetadata.single_sequence(num_tokens, self.block_size, self.device, store=store)

    def padded(self, md: AttentionMetadata, num_tokens: int) -> AttentionMetadata:
        """``md`` over ``num_tokens`` >= its tokens: the extra tokens store nothing and belong to no
        sequence (piecewise graphs run a token bucket)."""
        n = md.slot_mapping.shape[0]
        if num_tokens == n:
            return md
        slots = torch.cat([md.slot_mapping, md.slot_mapping.new_full((num_tokens - n,), -1)])
        return AttentionMetadata(
            slots, md.query_start_loc, md.seq_lens, md.block_tables, md.max_query_len, md.max_seq_len
        )

    def warmup_steps(
        self, num_heads: int, num_kv_heads: int, head_dim: int, dtype
    ) -> list[AttentionMetadata]:
        """Dummy steps that launch every kernel variant a run can pick (none to warm up here)."""
        return []

    # ------------------------------------------------------------------ full CUDA graphs

    def allocate_graph_buffers(self, max_seqs: int, max_blocks_per_seq: int) -> None:
        """Fixed-address metadata of pure-decode steps of up to ``max_seqs`` sequences."""
        dev = self.device
        ints = dict(dtype=torch.int32, device=dev)
        self._graph = {
            "slot_mapping": torch.full((max_seqs,), -1, dtype=torch.long, device=dev),
            "query_start_loc": torch.arange(max_seqs + 1, **ints),
            "seq_lens": torch.ones(max_seqs, **ints),
            "block_tables": torch.zeros(max_seqs, max_blocks_per_seq, **ints),
        }

    def graph_metadata(self, md: AttentionMetadata | None, size: int) -> AttentionMetadata:
        """Metadata of a decode step padded to ``size`` sequences, in the fixed buffers: ``md``'s rows
        copied in (none for capture), the padding rows storing nothing and attending to one slot."""
        buf = self._graph
        n = 0
        if md is not None:
            n = md.num_seqs
            buf["slot_mapping"][:n].copy_(md.slot_mapping)
            buf["seq_lens"][:n].copy_(md.seq_lens)
            buf["block_tables"][:n, : md.block_tables.shape[1]].copy_(md.block_tables)
        if size > n:
            buf["slot_mapping"][n:size].fill_(-1)
            buf["seq_lens"][n:size].fill_(1)
        table = buf["block_tables"]
        return AttentionMetadata(
            slot_mapping=buf["slot_mapping"][:size],
            query_start_loc=buf["query_start_loc"][: size + 1],
            seq_lens=buf["seq_lens"][:size],
            block_tables=table[:size],
            max_query_len=1,
            max_seq_len=table.shape[1] * self.block_size,
        )


class TorchAttention(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False

    def forward(self, q, k, v, out, kv_cache, md, scale, sliding_window, k_scale=1.0, v_scale=1.0):
        from kiln.ops.attention_ref import paged_attention_ref, store_kv_ref

        store_kv_ref(k, v, kv_cache, md.slot_mapping, k_scale, v_scale)
        paged_attention_ref(q, kv_cache, md, scale, sliding_window, out=out, k_scale=k_scale, v_scale=v_scale)


class TritonAttention(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def forward(self, q, k, v, out, kv_cache, md, scale, sliding_window, k_scale=1.0, v_scale=1.0):
        from kiln.ops.triton_attention import paged_attention_triton, store_kv_triton

        store_kv_triton(k, v, kv_cache, md.slot_mapping, k_scale, v_scale)
        paged_attention_triton(
            q, kv_cache, md, scale, sliding_window, out=out, k_scale=k_scale, v_scale=v_scale
        )

    def warmup_steps(self, num_heads, num_kv_heads, head_dim, dtype):
        from kiln.ops.triton_attention import warmup_metadata

        return warmup_metadata(num_heads, num_kv_heads, head_dim, self.block_size, dtype, self.device)


BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttention, "triton": TritonAttention}


def attention_backend_class(name: str) -> type[AttentionBackend]:
    if name not in BACKENDS:
        raise ValueError(f"attention_config backend must be one of {tuple(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


_shared: dict[str, AttentionBackend] = {}


def get_attention_backend(backend: "str | AttentionBackend") -> AttentionBackend:
    """A backend object; a name gives a shared instance (enough for running the op)."""
    if isinstance(backend, AttentionBackend):
        return backend
    if backend not in _shared:
        _shared[backend] = attention_backend_class(backend)()
    return _shared[backend]
