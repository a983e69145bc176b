"""Checkpoint discovery, sharded loading and every loader error."""

import json
import os
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln import LLM
from kiln.models.config import ModelConfig
from kiln.models.hub import resolve_model_path
from kiln.models.loader import build_model, read_config


def copy_ckpt(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def load(path):
    cfg = ModelConfig.from_dict(read_config(str(path)))
    return build_model(str(path), cfg, torch.float32, torch.device("cpu"))


def test_missing_directory():
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path("/nonexistent/model/dir")


def test_missing_gguf_file():
    with pytest.raises(ValueError, match="GGUF file"):
        resolve_model_path("/nowhere/model.gguf")


def test_hub_id_not_in_local_cache_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        resolve_model_path("nobody/no-such-model")


def test_hub_id_resolved_from_local_cache(monkeypatch, tmp_path, tiny_checkpoint):
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_checkpoint("llama"), snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert os.path.samefile(resolve_model_path("acme/tiny"), snapshot)


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        read_config(str(tmp_path))


def test_missing_weights(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint("llama"), tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load(path)


def test_unsupported_architecture_lists_supported(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint("llama"), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        LLM(str(path), enforce_eager=True)


def _rewrite_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    return str(file)


def test_missing_tensor_named(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint("llama"), tmp_path)
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensors.*layers.1.mlp.gate_up_proj"):
        load(path)


def test_shape_mismatch_names_file_and_tensor(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint("llama"), tmp_path)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    file = _rewrite_weights(path, shrink)
    with pytest.raises(ValueError, match=rf"{file}.*k_proj.weight.*shape \(63, 128\).*\(64, 128\)"):
        load(path)


def test_unexpected_tensor_named(tmp_path, tiny_checkpoint):
    path = copy_ckpt(tiny_checkpoint("llama"), tmp_path)
    _rewrite_weights(path, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        load(path)


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(src)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = load(src), load(sharded)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_missing_shard(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")).save_pretrained(
        sharded, max_shard_size="200KB"
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(sharded / victim)
    with pytest.raises(ValueError, match=f"shard .*{victim}.* is missing"):
        load(sharded)


def test_dtype_auto_and_explicit(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    with LLM(path, enforce_eager=True) as llm:
        # CPU keeps float32; on GPU a float32 checkpoint runs in float16
        assert llm.config.dtype == (torch.float16 if torch.cuda.is_available() else torch.float32)
    with LLM(path, enforce_eager=True, dtype="bfloat16") as llm:
        assert llm.llm_engine.model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert llm.llm_engine.kv_caches[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, enforce_eager=True, dtype="int8")


def test_truncated_safetensors_is_named_as_damaged(tmp_path, tiny_checkpoint):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"weights file '{weights}' is damaged or incomplete"):
        LLM(str(path), enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24)


def test_truncated_gguf_is_named_as_damaged(tmp_path, smollm_gguf):
    broken = tmp_path / "broken.gguf"
    with open(smollm_gguf, "rb") as src:
        broken.write_bytes(src.read(os.path.getsize(smollm_gguf) // 2))
    with pytest.raises(ValueError, match=f"GGUF file '{broken}' is damaged or incomplete"):
        LLM(str(broken), enforce_eager=True, kv_cache_memory_bytes=2**24)
