"""``PoolerConfig`` (model-level pooling defaults, ``LLM(pooler_config=...)``) and ``PoolingParams``
(per-request parameters of ``embed`` / ``classify`` / ``score`` / ``reward`` / ``encode``).

``normalize``, ``softmax`` and ``activation`` are the older names of ``use_activation``: they are
accepted, with a DeprecationWarning, and folded into it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields

SEQ_POOLING_TYPES = ("CLS", "LAST", "MEAN")
TOK_POOLING_TYPES = ("ALL",)
POOLING_TASKS = ("embed", "classify", "score", "token_embed", "token_classify")


def _fold_deprecated(obj, owner: str) -> None:
    for old in ("normalize", "softmax", "activation"):
        value = getattr(obj, old)
        if value is None:
            continue
        warnings.warn(
            f"{owner}.{old} is deprecated; use use_activation instead", DeprecationWarning, stacklevel=4
        )
        if obj.use_activation is None:
            obj.use_activation = bool(value)
        setattr(obj, old, None)


def _check_dimensions(owner: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{owner}.dimensions must be a positive integer, got {value!r}")


@dataclass
class PoolerConfig:
    """How a pooling model turns hidden states into its output.

    Attributes:
        pooling_type: Shorthand for ``seq_pooling_type`` ("CLS", "LAST", "MEAN") or
            ``tok_pooling_type`` ("ALL").
        seq_pooling_type: Pooling of the ``embed`` / ``classify`` / ``score`` tasks; default "LAST".
        tok_pooling_type: Pooling of the per-token tasks; only "ALL".
        use_activation: Normalise embeddings / apply the classifier's activation; default True.
        dimensions: Default Matryoshka truncation of embeddings (the model must support it).
        logit_bias: Added to classification logits before the activation.
        enable_chunked_processing, max_embed_len, step_tag_id, returned_token_ids: not implemented
            (accepted at their defaults only).
    """

    pooling_type: str | None = None
    seq_pooling_type: str | None = None
    tok_pooling_type: str | None = None
    normalize: bool | None = None
    dimensions: int | None = None
    enable_chunked_processing: bool | None = None
    max_embed_len: int | None = None
    softmax: bool | None = None
    activation: bool | None = None
    use_activation: bool | None = None
    logit_bias: float | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        _fold_deprecated(self, "PoolerConfig")
        if self.pooling_type is not None:
            if self.seq_pooling_type is not None or self.tok_pooling_type is not None:
                raise ValueError(
                    "PoolerConfig: set pooling_type or seq_pooling_type/tok_pooling_type, not both"
                )
            if self.pooling_type in SEQ_POOLING_TYPES:
                self.seq_pooling_type = self.pooling_type
            elif self.pooling_type in TOK_POOLING_TYPES:
                self.tok_pooling_type = self.pooling_type
            else:
                raise ValueError(
                    f"PoolerConfig.pooling_type must be one of {SEQ_POOLING_TYPES + TOK_POOLING_TYPES}, "
                    f"got {self.pooling_type!r}"
                )
        if self.seq_pooling_type not in (None, *SEQ_POOLING_TYPES):
            raise ValueError(
                f"PoolerConfig.seq_pooling_type must be one of {SEQ_POOLING_TYPES}, "
                f"got {self.seq_pooling_type!r}"
            )
        if self.tok_pooling_type not in (None, *TOK_POOLING_TYPES):
            raise ValueError(
                f"PoolerConfig.tok_pooling_type must be one of {TOK_POOLING_TYPES}, "
                f"got {self.tok_pooling_type!r} (STEP pooling is not implemented)"
            )
        _check_dimensions("PoolerConfig", self.dimensions)
        unsupported = {
            "enable_chunked_processing": bool(self.enable_chunked_processing),
            "max_embed_len": self.max_embed_len is not None,
            "step_tag_id": self.step_tag_id is not None,
            "returned_token_ids": self.returned_token_ids is not None,
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise NotImplementedError(f"kiln does not implement PoolerConfig field(s) {named}")

    @classmethod
    def parse(cls, value) -> PoolerConfig:
        """``None``, a dict of fields or a ``PoolerConfig``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return copy.copy(value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"pooler_config: unknown keys {unknown}")
            return cls(**value)
        raise ValueError(f"pooler_config must be a PoolerConfig or a dict, got {type(value).__name__}")


@dataclass
class PoolingParams:
    """Per-request parameters of pooling models.

    Attributes:
        truncate_prompt_tokens: Keep only the last k prompt tokens (-1: the last ``max_model_len``).
        dimensions: Matryoshka truncation of embeddings (``embed`` / ``token_embed``; the model must
            support it).
        use_activation: Normalise embeddings / apply the classifier's activation (sigmoid for one
            label, softmax otherwise); ``None`` takes the model's default.
        normalize, softmax, activation: Deprecated names of ``use_activation``.
        task: The pooling task, set by the method called (``embed`` sets "embed", and so on).
    """

    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    use_activation: bool | None = None
    normalize: bool | None = None
    softmax: bool | None = None
    activation: bool | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        _fold_deprecated(self, "PoolingParams")
        _check_dimensions("PoolingParams", self.dimensions)
        t = self.truncate_prompt_tokens
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < -1 or t == 0):
            raise ValueError(f"PoolingParams.truncate_prompt_tokens must be -1 or >= 1, got {t!r}")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"PoolingParams.task must be one of {POOLING_TASKS}, got {self.task!r}")
        named = [n for n in ("step_tag_id", "returned_token_ids") if getattr(self, n) is not None]
        if named:
            raise NotImplementedError(f"kiln does not implement PoolingParams field(s) {named}")

    @property
    def valid_parameters(self) -> dict[str, list[str]]:
        return {
            "embed": ["dimensions", "use_activation"],
            "classify": ["use_activation"],
            "score": ["use_activation"],
            "token_embed": ["dimensions", "use_activation"],
            "token_classify": ["use_activation"],
        }

    def clone(self) -> PoolingParams:
        return copy.deepcopy(self)
