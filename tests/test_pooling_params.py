"""PoolerConfig / PoolingParams validation and the runner/convert resolution (no model needed)."""

import pytest

from kiln import PoolerConfig, PoolingParams
from kiln.pooling.spec import resolve_runner

RAW = {"hidden_size": 64}


def test_pooler_config_fields():
    assert PoolerConfig(pooling_type="MEAN").seq_pooling_type == "MEAN"
    assert PoolerConfig(pooling_type="ALL").tok_pooling_type == "ALL"
    assert PoolerConfig.parse({"seq_pooling_type": "CLS"}).seq_pooling_type == "CLS"
    with pytest.warns(DeprecationWarning, match="normalize"):
        assert PoolerConfig(normalize=False).use_activation is False
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        PoolerConfig(pooling_type="MAX")
    with pytest.raises(ValueError, match="not both"):
        PoolerConfig(pooling_type="MEAN", seq_pooling_type="LAST")
    with pytest.raises(ValueError, match="pooler_config: unknown keys"):
        PoolerConfig.parse({"pooling": "MEAN"})
    with pytest.raises(NotImplementedError, match="step_tag_id"):
        PoolerConfig(step_tag_id=3)


def test_pooling_params_fields():
    with pytest.warns(DeprecationWarning, match="activation"):
        assert PoolingParams(activation=False).use_activation is False
    with pytest.raises(ValueError, match="dimensions must be a positive integer"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=-2)
    with pytest.raises(ValueError, match="task must be one of"):
        PoolingParams(task="generate")
    p = PoolingParams(dimensions=8)
    assert p.clone() == p and p.clone() is not p


@pytest.mark.parametrize(
    "arch, runner, convert, expected",
    [
        ("LlamaForCausalLM", "auto", "auto", None),
        ("LlamaForCausalLM", "generate", "none", None),
        ("LlamaForCausalLM", "pooling", "auto", "embed"),
        ("LlamaForCausalLM", "auto", "embed", "embed"),
        ("Qwen3ForCausalLM", "auto", "reward", "reward"),
        ("Qwen2ForSequenceClassification", "auto", "auto", "classify"),
        ("Qwen2ForSequenceClassification", "pooling", "embed", "embed"),
        ("Qwen2ForRewardModel", "auto", "none", "reward"),
        ("Qwen3Model", "auto", "auto", "embed"),
    ],
)
def test_runner_and_convert_resolution(arch, runner, convert, expected):
    spec = resolve_runner(arch, dict(RAW, num_labels=1), runner, convert, None)
    assert (spec and spec.convert) == expected


def test_task_support_follows_the_head():
    cls = resolve_runner("LlamaForSequenceClassification", dict(RAW, num_labels=3), "auto", "auto", None)
    assert cls.supported_tasks == ("classify", "token_classify") and cls.classifier_activation == "softmax"
    one = resolve_runner("LlamaForSequenceClassification", dict(RAW, num_labels=1), "auto", "auto", None)
    assert one.supports_score and one.classifier_activation == "sigmoid"
    reg = dict(RAW, num_labels=1, problem_type="regression")
    assert resolve_runner(
        "Qwen3ForSequenceClassification", reg, "auto", "auto", None
    ).classifier_activation == ("identity")
    emb = resolve_runner("LlamaForCausalLM", RAW, "pooling", "auto", {"pooling_type": "MEAN"})
    assert emb.seq_pooling_type == "MEAN" and emb.supports_score and emb.num_labels == 64
    with pytest.raises(ValueError, match="pooler_config applies to pooling models only"):
        resolve_runner("LlamaForCausalLM", RAW, "generate", "auto", PoolerConfig())
    with pytest.raises(ValueError, match="convert must be one of"):
        resolve_runner("LlamaForCausalLM", RAW, "pooling", "rerank", None)
