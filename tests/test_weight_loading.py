"""Weights come from views of the memory-mapped file and are copied once, on several threads, straight
into the fused parameters; the result equals the checkpoint (safetensors' own reader is the oracle)."""

import glob
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.models.config import ModelConfig
from kiln.models.loader import build_model, iter_safetensors, read_config
from kiln.models.safetensors_mmap import open_safetensors
from kiln.models.weight_copy import copy_into, parallel_copies


def _reference(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _expected_params(ref: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The checkpoint in kiln's layout: q/k/v and gate/up concatenated along the rows."""
    out = dict(ref)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        qkv = [out.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        out[p + "self_attn.qkv_proj.weight"] = torch.cat(qkv)
        gate_up = [out.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
        out[p + "mlp.gate_up_proj.weight"] = torch.cat(gate_up)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_loaded_parameters_equal_the_checkpoint(tiny_checkpoint, dtype, threads, monkeypatch):
    import kiln.models.weight_copy as weight_copy

    monkeypatch.setattr(weight_copy, "default_threads", lambda: threads)
    path = tiny_checkpoint("qwen3")
    mc = ModelConfig.from_dict(read_config(path))
    model = build_model(path, mc, dtype, torch.device("cpu"))
    expected = _expected_params(_reference(path), mc.num_layers)
    params = dict(model.named_parameters())
    assert set(params) <= set(expected)
    for name, p in params.items():
        assert torch.equal(p.detach(), expected[name].to(dtype)), name


def test_tensors_are_views_of_one_mapped_file(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    tensors = list(iter_safetensors(path))
    ref = _reference(path)
    assert {name for name, _, _ in tensors} == set(ref)
    storages = {t.untyped_storage().data_ptr() for _, t, _ in tensors}
    assert len(storages) == 1  # no tensor was copied out of the map
    for name, t, _ in tensors:
        assert torch.equal(t, ref[name]), name


def test_unaligned_and_odd_dtypes(tmp_path):
    tensors = {
        "a": torch.arange(3, dtype=torch.uint8),  # leaves the next tensor unaligned unless padded
        "b": torch.randn(5, 7, dtype=torch.float32),
        "c": torch.tensor([True, False]),
        "d": torch.randn(4, dtype=torch.float64).to(torch.bfloat16),
        "e": torch.zeros(0, 3),
    }
    file = str(tmp_path / "x.safetensors")
    save_file(tensors, file)
    got = dict(open_safetensors(file))
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_damaged_header_is_named(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(file))
    data = file.read_bytes()
    file.write_bytes(data[:-8])  # the data ends early
    with pytest.raises(ValueError, match="damaged or incomplete .*tensor 'w'"):
        list(open_safetensors(str(file)))
    file.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="damaged or incomplete .*header of"):
        list(open_safetensors(str(file)))


def test_copy_errors_surface_at_the_end_of_the_block():
    dest = torch.empty(4)
    with pytest.raises(RuntimeError):
        with parallel_copies(torch.device("cpu"), threads=2):
            copy_into(dest, torch.ones(5))  # not broadcastable: fails on a copy thread
    with parallel_copies(torch.device("cpu"), threads=2):
        copy_into(dest, torch.full((4,), 2.0))
    assert torch.equal(dest, torch.full((4,), 2.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_staged_copies_to_the_gpu_equal_the_checkpoint(tiny_checkpoint, dtype, monkeypatch):
    import kiln.models.weight_copy as weight_copy

    monkeypatch.setattr(weight_copy, "CHUNK_BYTES", 4096)  # many chunks per tensor, odd tails
    path = tiny_checkpoint("qwen3")
    mc = ModelConfig.from_dict(read_config(path))
    model = build_model(path, mc, dtype, torch.device("cuda"))
    expected = _expected_params(_reference(path), mc.num_layers)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().cpu(), expected[name].to(dtype)), name
