"""Vocabulary-parallel embedding and lm_head: each rank holds ``ceil(vocab / size)`` rows.

The embedding looks up the ids in its rows (zeros for the others) and all-reduces; the lm_head's
logits are gathered over the ranks (and the padding columns cut) before sampling. With one rank both
are the plain layers.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kiln.distributed import parallel_state
from kiln.distributed.parallel_state import TensorParallel
from kiln.distributed.sharding import vocab_rows


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        rows = vocab_rows(vocab_size, tp.size)
        super().__init__(rows, hidden_size)
        self.tp, self.vocab_start = tp, tp.rank * rows

    def reset_parameters(self) -> None:
        """No initial values: the model is built on the meta device and its weights always come from the
        checkpoint (or the dummy loader). ``nn.Embedding``'s own ``normal_`` on a meta tensor runs
        torch's Python reference, which imports the whole of Dynamo (seconds at start-up)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        return parallel_state.all_reduce(hidden.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class ParallelLMHead(nn.Linear):
    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel):
        super().__init__(hidden_size, vocab_rows(vocab_size, tp.size), bias=False)


def gather_logits(local_logits: torch.Tensor, vocab_size: int, tp: TensorParallel) -> torch.Tensor:
    """Every rank's vocabulary columns, in order, without the padding."""
    if tp.size == 1:
        return local_logits
    return parallel_state.all_gather_last_dim(local_logits, tp)[:, :vocab_size]
