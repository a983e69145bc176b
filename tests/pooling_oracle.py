"""Tiny pooling checkpoints built with transformers, and HF computations to compare kiln's pooling with."""

import json
import os
import shutil

import torch
from conftest import TINY_ARCHS

CLS_ARCHS = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}


def tiny_config(arch: str, tokenizer_dir: str, **overrides):
    import transformers

    config_name, extra = TINY_ARCHS[arch]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.08,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    kwargs.update(extra)
    if arch == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return getattr(transformers, config_name)(**kwargs)


def _randomise_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.05)


def _copy_tokenizer(tokenizer_dir: str, out_dir: str) -> None:
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out_dir)


def make_classifier(out_dir: str, arch: str, tokenizer_dir: str, num_labels: int) -> str:
    import transformers

    labels = {i: f"label_{i}" for i in range(num_labels)}
    config = tiny_config(
        arch,
        tokenizer_dir,
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(1)
    model = getattr(transformers, CLS_ARCHS[arch])(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    _randomise_biases(model)
    model.save_pretrained(out_dir)
    _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def make_base_model(out_dir: str, arch: str, tokenizer_dir: str, architectures=None, **overrides) -> str:
    """An ``AutoModel`` (decoder only, tensor names without ``model.``) as Qwen3-Embedding ships."""
    import transformers

    torch.manual_seed(2)
    model = transformers.AutoModel.from_config(tiny_config(arch, tokenizer_dir, **overrides)).eval()
    _randomise_biases(model)
    model.save_pretrained(out_dir)
    if architectures is not None:
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["architectures"] = architectures
        with open(path, "w") as f:
            json.dump(cfg, f)
    _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def make_qwen2_reward(out_dir: str, tokenizer_dir: str) -> str:
    """``Qwen2ForRewardModel`` as Qwen2.5-Math-RM ships it: Qwen2 decoder + score (linear, ReLU, linear)."""
    from safetensors.torch import save_file

    make_base_model(out_dir, "qwen2", tokenizer_dir, architectures=["Qwen2ForRewardModel"], num_labels=1)
    from safetensors.torch import load_file

    weights = {"model." + k: v for k, v in load_file(os.path.join(out_dir, "model.safetensors")).items()}
    torch.manual_seed(3)
    hidden = 64
    weights.update(
        {
            "score.0.weight": torch.randn(hidden, hidden) * 0.2,
            "score.0.bias": torch.randn(hidden) * 0.1,
            "score.2.weight": torch.randn(1, hidden) * 0.2,
            "score.2.bias": torch.randn(1) * 0.1,
        }
    )
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir


@torch.no_grad()
def hf_classifier_logits(model_dir: str, prompts_ids: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [model(torch.tensor([ids])).logits[0] for ids in prompts_ids]


@torch.no_grad()
def hf_hidden_states(model_dir: str, prompts_ids: list[list[int]]) -> list[torch.Tensor]:
    """The final (normed) hidden states ``[len, hidden]`` of each prompt, one forward per prompt."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [model(torch.tensor([ids])).last_hidden_state[0] for ids in prompts_ids]


def pool(hidden: torch.Tensor, kind: str) -> torch.Tensor:
    return {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[kind]


@torch.no_grad()
def hf_rewards(model_dir: str, prompts_ids: list[list[int]]) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    w = load_file(os.path.join(model_dir, "model.safetensors"))
    out = []
    for hidden in hf_hidden_states(model_dir, prompts_ids):
        h = torch.relu(hidden @ w["score.0.weight"].T + w["score.0.bias"])
        out.append(h @ w["score.2.weight"].T + w["score.2.bias"])
    return out
