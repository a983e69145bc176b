"""Heads on top of pooled hidden states, and the post-processing of each task: Matryoshka
truncation and normalisation of embeddings, logit bias and activation of classifier outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.pooling.spec import PoolingModelSpec


def build_head(spec: PoolingModelSpec, hidden_size: int) -> nn.Module | None:
    """``score`` of ``*ForSequenceClassification`` (linear, no bias) or of ``Qwen2ForRewardModel``
    (linear, ReLU, linear, with biases); ``None`` when the model outputs hidden states."""
    if spec.head == "score":
        return nn.Linear(hidden_size, spec.num_labels, bias=False)
    if spec.head == "reward_mlp":
        return nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, spec.num_labels)
        )
    return None


def activate(logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return logits.sigmoid()
    if kind == "softmax":
        return logits.softmax(-1)
    return logits


def finish_task(
    x: torch.Tensor,
    head: nn.Module | None,
    spec: PoolingModelSpec,
    task: str,
    dimensions: int | None,
    use_activation: bool,
) -> torch.Tensor:
    """Pooled hidden states ``[rows, hidden]`` -> the task's output rows, in float32."""
    if task in ("embed", "token_embed"):
        x = x.float()
        if dimensions is not None:
            x = x[..., :dimensions]
        return F.normalize(x, p=2, dim=-1) if use_activation else x
    logits = (head(x) if head is not None else x).float()
    if spec.logit_bias is not None:
        logits = logits + spec.logit_bias
    return activate(logits, spec.classifier_activation) if use_activation else logits
