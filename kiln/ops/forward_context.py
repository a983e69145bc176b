"""The per-step state that the attention op reads: metadata, KV caches and the chosen backend.

The model graph carries only tensors and a layer index; everything else is looked up here, so a
compiled or graph-captured forward stays valid across steps.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kiln.ops.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    metadata: AttentionMetadata | None = None
    kv_caches: list[torch.Tensor] = field(default_factory=list)
    backend: str = "torch"


_context = ForwardContext()


def get_forward_context() -> ForwardContext:
    return _context


@contextmanager
def forward_context(metadata: AttentionMetadata, kv_caches: list[torch.Tensor], backend: str):
    global _context
    previous = _context
    _context = ForwardContext(metadata, kv_caches, backend)
    try:
        yield _context
    finally:
        _context = previous
