"""Pooling models: embeddings, classification, scoring and rewards on kiln's engine.

Kept free of model imports: ``kiln.models.config`` reads ``kiln.pooling.architectures``.
"""

from kiln.pooling.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from kiln.pooling.params import PoolerConfig, PoolingParams

__all__ = [
    "PoolerConfig",
    "PoolingParams",
    "PoolingOutput",
    "PoolingRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
]
