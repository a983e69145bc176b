"""The per-step state that the attention op and the CUDA-graph wrappers read.

The model graph carries only tensors and a layer index; everything else is looked up here, so a
compiled or graph-captured forward stays valid across steps. This is the one piece of global state on
the forward path: ``graph_mode`` and ``num_tokens`` tell each ``CUDAGraphWrapper`` whether to replay
(or, with ``capturing``, capture) its graph for this token count.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kiln.ops.attention_backend import AttentionBackend, get_attention_backend
from kiln.ops.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    metadata: AttentionMetadata | None = None
    kv_caches: list[torch.Tensor] = field(default_factory=list)
    backend: AttentionBackend | None = None
    graph_mode: str = "none"  # "full" or "piecewise": wrappers of that mode replay the graph for num_tokens
    num_tokens: int = 0  # padded token count (full graphs: sequences) of the step
    capturing: bool = False  # wrappers without a graph for num_tokens capture one


_context = ForwardContext()


def get_forward_context() -> ForwardContext:
    return _context


@contextmanager
def forward_context(
    metadata: AttentionMetadata,
    kv_caches: list[torch.Tensor],
    backend: "str | AttentionBackend",
    graph_mode: str = "none",
    num_tokens: int = 0,
    capturing: bool = False,
):
    global _context
    previous = _context
    _context = ForwardContext(
        metadata, kv_caches, get_attention_backend(backend), graph_mode, num_tokens, capturing
    )
    try:
        yield _context
    finally:
        _context = previous
