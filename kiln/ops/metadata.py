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

    @classmethod
    def single_sequence(
        cls, num_tokens: int, block_size: int, device, store: bool = True
    ) -> "AttentionMetadata":
        """One sequence prefilling ``num_tokens`` tokens from position 0 (dummy and profiling runs).

        With ``store`` its K/V go to blocks 0, 1, ... of a cache that has that many; without, every
        slot is -1 and every block-table entry 0, so any cache with one block can serve it untouched.
        """
        blocks = -(-num_tokens // block_size)
        if store:
            slots = torch.arange(num_tokens, device=device)
            table = torch.arange(blocks, dtype=torch.int32, device=device)[None]
        else:
            slots = torch.full((num_tokens,), -1, device=device)
            table = torch.zeros(1, blocks, dtype=torch.int32, device=device)
        return cls(
            slot_mapping=slots,
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
            block_tables=table,
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
