"""Results of the pooling methods, with vLLM's names: ``PoolingRequestOutput`` holds a
``PoolingOutput`` (the raw tensor), and the task-specific views ``EmbeddingRequestOutput``,
``ClassificationRequestOutput`` and ``ScoringRequestOutput`` turn it into plain lists and floats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

_O = TypeVar("_O")


@dataclass
class PoolingOutput:
    """The pooled data of one request (on the host): ``[dim]`` for sequence tasks,
    ``[num_prompt_tokens, dim]`` for per-token tasks."""

    data: torch.Tensor

    def __repr__(self) -> str:
        return f"PoolingOutput(data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolingOutput) and bool(torch.equal(self.data, other.data))


class PoolingRequestOutput(Generic[_O]):
    """Everything produced for one prompt of a pooling model.

    Attributes:
        request_id: Unique id of the request.
        outputs: The pooled result (``PoolingOutput``, or a task view such as ``EmbeddingOutput``).
        prompt_token_ids: Token ids of the prompt that was pooled.
        num_cached_tokens: Prompt tokens served from the prefix cache.
        finished: Always True (pooling requests finish in one go).
    """

    def __init__(
        self,
        request_id: str,
        outputs: _O,
        prompt_token_ids: list[int],
        num_cached_tokens: int = 0,
        finished: bool = True,
    ):
        self.request_id = request_id
        self.outputs = outputs
        self.prompt_token_ids = prompt_token_ids
        self.num_cached_tokens = num_cached_tokens
        self.finished = finished

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(request_id={self.request_id!r}, outputs={self.outputs!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, num_cached_tokens={self.num_cached_tokens}, "
            f"finished={self.finished})"
        )


@dataclass
class EmbeddingOutput:
    """One embedding vector."""

    embedding: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> EmbeddingOutput:
        data = pooling_output.data
        if data.ndim != 1:
            raise ValueError("pooled data should be 1-D for an embedding")
        return EmbeddingOutput(data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> EmbeddingRequestOutput:
        return EmbeddingRequestOutput(
            request_id=request_output.request_id,
            outputs=EmbeddingOutput.from_base(request_output.outputs),
            prompt_token_ids=request_output.prompt_token_ids,
            num_cached_tokens=request_output.num_cached_tokens,
            finished=request_output.finished,
        )


@dataclass
class ClassificationOutput:
    """Class probabilities (or raw logits with ``use_activation=False``) of one prompt."""

    probs: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ClassificationOutput:
        data = pooling_output.data
        if data.ndim != 1:
            raise ValueError("pooled data should be 1-D for a classification")
        return ClassificationOutput(data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> ClassificationRequestOutput:
        return ClassificationRequestOutput(
            request_id=request_output.request_id,
            outputs=ClassificationOutput.from_base(request_output.outputs),
            prompt_token_ids=request_output.prompt_token_ids,
            num_cached_tokens=request_output.num_cached_tokens,
            finished=request_output.finished,
        )


@dataclass
class ScoringOutput:
    """The similarity or relevance score of one pair."""

    score: float

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ScoringOutput:
        data = pooling_output.data
        if data.numel() != 1:
            raise ValueError("pooled data should hold one value for a score")
        return ScoringOutput(data.item())


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> ScoringRequestOutput:
        return ScoringRequestOutput(
            request_id=request_output.request_id,
            outputs=ScoringOutput.from_base(request_output.outputs),
            prompt_token_ids=request_output.prompt_token_ids,
            num_cached_tokens=request_output.num_cached_tokens,
            finished=request_output.finished,
        )
