"""Attention metadata for one forward step over a flattened, unpadded token batch.

A step holds ``num_seqs`` sequences. Sequence ``i`` contributes the query tokens
``query_start_loc[i]:query_start_loc[i + 1]`` of the flat batch; those tokens are the *last*
``query_len`` positions of a context of ``seq_lens[i]`` tokens (so a decode step has query_len 1,
a first prefill chunk has query_len == seq_len, and a later chunk or a prefix-cache hit starts
mid-sequence). K/V of every context position live in the paged cache; block ``j`` of sequence
``i`` is ``block_tables[i, j]``.

KV cache layout, one tensor per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = K, 1 = V). Slot ``s`` is block ``s // block_size``, offset ``s % block_size``.
"""

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]; -1 = padding token, not stored
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs], context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], unused entries arbitrary
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
