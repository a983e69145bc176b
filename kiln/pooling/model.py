"""The decoder of a causal LM without its language-model head, plus the pooling head when the
checkpoint has one. Loads ``*ForSequenceClassification``, ``Qwen2ForRewardModel``, ``*Model`` and
causal-LM checkpoints (whose ``lm_head`` is skipped), with or without the ``model.`` name prefix."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM
from kiln.pooling.heads import build_head
from kiln.pooling.spec import PoolingModelSpec

_DECODER_PREFIXES = ("embed_tokens.", "layers.", "norm.")


class LlamaForPooling(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, spec: PoolingModelSpec):
        # tied embeddings: no lm_head parameter (compute_logits stays usable for start-up profiling)
        super().__init__(dataclasses.replace(cfg, tie_word_embeddings=True))
        self.spec = spec
        self.score = build_head(spec, cfg.hidden_size)

    def checkpoint_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The decoder's parameters (the head loads separately)."""
        return {k: v for k, v in self.named_parameters() if not k.startswith("score.")}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor, str]]) -> None:
        head = dict(self.score.named_parameters()) if self.score is not None else {}
        loaded: set[str] = set()
        source = ["checkpoint"]

        def decoder_weights() -> Iterator[tuple[str, torch.Tensor, str]]:
            for name, tensor, src in weights:
                source[0] = src
                if name.startswith("score."):
                    if self.score is None:  # hidden states of a classifier checkpoint: head unused
                        continue
                    key = name[len("score.") :]
                    if key not in head:
                        raise ValueError(f"{src}: unexpected tensor {name!r} (no matching head parameter)")
                    if tuple(tensor.shape) != tuple(head[key].shape):
                        raise ValueError(
                            f"{src}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(head[key].shape)}"
                        )
                    head[key].data.copy_(tensor)
                    loaded.add(key)
                    continue
                if name == "lm_head.weight":
                    continue
                if name.startswith(_DECODER_PREFIXES):
                    name = "model." + name
                yield name, tensor, src

        super().load_weights(decoder_weights())
        missing = sorted(set(head) - loaded)
        if missing:
            raise ValueError(
                f"{source[0]}: missing tensors for the pooling head {['score.' + m for m in missing]}; "
                f"is this a {self.config.architecture} checkpoint?"
            )
