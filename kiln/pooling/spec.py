"""What a pooling model does, resolved once at start-up from the checkpoint's architecture and config,
``LLM(runner=..., convert=..., pooler_config=...)``, with vLLM's meanings:

* ``runner="auto"``: "pooling" for pooling architectures (``*ForSequenceClassification``,
  ``Qwen2ForRewardModel``, ``*Model``) or when ``convert`` asks for a pooling conversion, else "generate".
* ``convert="auto"``: the architecture's own pooling, and "embed" for a causal LM run as a pooling model.
* ``convert="embed"``: the final hidden states pooled (LAST by default) and normalised; any checkpoint.
* ``convert="classify"``: the ``score`` head of a ``*ForSequenceClassification`` checkpoint on the pooled
  state, then sigmoid (one label) or softmax.
* ``convert="reward"``: per-token output; ``Qwen2ForRewardModel``'s two-layer score head, or for
  any other checkpoint the hidden state of every token as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.pooling.architectures import POOLING_ARCHITECTURES
from kiln.pooling.params import PoolerConfig

RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify", "reward")


@dataclass
class PoolingModelSpec:
    """The pooling side of a loaded model.

    Attributes:
        convert: "embed", "classify" or "reward".
        head: "none" (hidden states), "score" (one linear layer) or "reward_mlp" (linear, ReLU, linear).
        num_labels: Outputs of the head (the hidden size when there is none).
        id2label: Label names from the config.
        seq_pooling_type: "LAST", "MEAN" or "CLS" for the sequence tasks.
        use_activation: Model default for ``PoolingParams.use_activation`` per task.
        classifier_activation: "sigmoid", "softmax" or "identity".
        logit_bias: Added to logits before the activation.
        dimensions: Default Matryoshka dimensions of embeddings.
        matryoshka: Whether the checkpoint allows truncated embeddings; ``matryoshka_dimensions`` the
            sizes it allows (``None``: any).
        supported_tasks: The pooling tasks the model serves.
    """

    convert: str
    head: str
    num_labels: int
    id2label: dict[int, str] = field(default_factory=dict)
    seq_pooling_type: str = "LAST"
    use_activation: dict[str, bool] = field(default_factory=dict)
    classifier_activation: str = "identity"
    logit_bias: float | None = None
    dimensions: int | None = None
    matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None
    supported_tasks: tuple[str, ...] = ()

    @property
    def supports_score(self) -> bool:
        return "score" in self.supported_tasks


def _classifier_activation(raw: dict, num_labels: int) -> str:
    """transformers' loss conventions: regression has none, multi-label is per-label sigmoid."""
    problem = raw.get("problem_type") or ""
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification" or num_labels < 2:
        return "sigmoid"
    return "softmax"


def resolve_runner(
    architecture: str, raw: dict, runner: str, convert: str, pooler_config
) -> PoolingModelSpec | None:
    """The pooling spec for ``runner="pooling"`` (``None`` for a generative model); ValueError naming
    the option and the fix for combinations that cannot work."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    if convert not in CONVERTS:
        raise ValueError(f"convert must be one of {CONVERTS}, got {convert!r}")
    native = POOLING_ARCHITECTURES.get(architecture, (None, None))[1]
    if runner == "auto":
        runner = "pooling" if native or convert in ("embed", "classify", "reward") else "generate"
    if runner == "generate":
        if native:
            raise ValueError(
                f"runner='generate': {architecture} has no language-model head, so it cannot generate; "
                "use runner='pooling' (or 'auto') with embed/classify/score/reward/encode"
            )
        if convert not in ("auto", "none"):
            raise ValueError(
                f"convert={convert!r} makes a pooling model; pass runner='pooling' (or 'auto'), "
                "not runner='generate'"
            )
        if pooler_config is not None:
            raise ValueError("pooler_config applies to pooling models only; pass runner='pooling'")
        return None
    if convert == "none":
        if not native:
            raise ValueError(
                f"runner='pooling' with convert='none': {architecture} is not a pooling architecture; "
                "pass convert='embed' (or 'auto') to pool its hidden states"
            )
        convert = native
    elif convert == "auto":
        convert = native or "embed"
    if convert == "classify" and native != "classify":
        raise ValueError(
            f"convert='classify': {architecture} has no score head (it needs a *ForSequenceClassification "
            "checkpoint); use convert='embed' for embeddings"
        )
    cfg = PoolerConfig.parse(pooler_config)
    return _build_spec(architecture, raw, convert, native, cfg)


def _build_spec(architecture, raw, convert, native, cfg: PoolerConfig) -> PoolingModelSpec:
    hidden = raw["hidden_size"]
    id2label = {int(k): v for k, v in (raw.get("id2label") or {}).items()}
    num_labels = raw.get("num_labels") or len(id2label) or (1 if native == "reward" else 2)
    matryoshka_dims = raw.get("matryoshka_dimensions")
    spec = PoolingModelSpec(
        convert=convert,
        head="none",
        num_labels=hidden,
        seq_pooling_type=cfg.seq_pooling_type or "LAST",
        logit_bias=cfg.logit_bias,
        dimensions=cfg.dimensions,
        matryoshka=bool(raw.get("is_matryoshka") or matryoshka_dims),
        matryoshka_dimensions=list(matryoshka_dims) if matryoshka_dims else None,
    )
    default = True if cfg.use_activation is None else cfg.use_activation
    if convert == "embed":
        spec.supported_tasks = ("embed", "token_embed", "score")
        spec.use_activation = {"embed": default, "token_embed": default}
    elif convert == "classify":
        spec.head, spec.num_labels, spec.id2label = "score", num_labels, id2label
        spec.classifier_activation = _classifier_activation(raw, num_labels)
        spec.supported_tasks = ("classify", "token_classify") + (("score",) if num_labels == 1 else ())
        spec.use_activation = dict.fromkeys(("classify", "score", "token_classify"), default)
    else:  # reward: per-token output, raw unless asked
        if native == "reward":
            spec.head, spec.num_labels, spec.id2label = "reward_mlp", num_labels, id2label
            spec.classifier_activation = _classifier_activation(raw, num_labels)
        spec.supported_tasks = ("token_classify",)
        spec.use_activation = {"token_classify": bool(cfg.use_activation)}
    if spec.dimensions is not None:
        check_dimensions(spec, spec.dimensions, "pooler_config")
    return spec


def check_dimensions(spec: PoolingModelSpec, dimensions: int, where: str) -> None:
    """ValueError unless the model's embeddings may be truncated to ``dimensions``."""
    if not spec.matryoshka:
        raise ValueError(
            f"{where}: dimensions={dimensions}, but the model does not support Matryoshka embeddings "
            "(its config.json sets neither is_matryoshka nor matryoshka_dimensions); leave dimensions unset"
        )
    allowed = spec.matryoshka_dimensions
    if allowed is not None and dimensions not in allowed:
        raise ValueError(f"{where}: dimensions={dimensions}; the model supports {allowed}")
    if dimensions > spec.num_labels:
        raise ValueError(f"{where}: dimensions={dimensions} exceeds the hidden size {spec.num_labels}")
