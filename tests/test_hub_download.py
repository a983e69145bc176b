"""LLM(model="org/name") downloads what kiln reads through huggingface_hub (HF_ENDPOINT, revision,
HF_HUB_OFFLINE), here from a local server that answers like the hub."""

import os
import shutil

import pytest
from hub_server import HubServer

from kiln import LLM, SamplingParams
from kiln.models.hub import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"
TINY = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24, max_model_len=64)


@pytest.fixture
def hub(tmp_path, tiny_checkpoint, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_checkpoint("llama"), repo)
    (repo / "README.md").write_text("a model card kiln does not need")
    (repo / "pytorch_model.bin").write_bytes(b"weights in a format kiln does not read")
    with HubServer("acme/tiny", str(repo), {"main": COMMIT, "v1": COMMIT_V1}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def test_download_from_the_hub_endpoint(hub, tmp_path, tiny_checkpoint, capfd):
    cache = str(tmp_path / "cache")
    with LLM("acme/tiny", download_dir=cache, **TINY) as llm:
        path = llm.model_path
        got = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert path.startswith(cache) and path.endswith(COMMIT)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert not {"README.md", "pytorch_model.bin"} & set(os.listdir(path))
    assert ("GET", "/acme/tiny/resolve/" + COMMIT + "/pytorch_model.bin") not in hub.requests
    assert "Fetching" in capfd.readouterr().err  # the download's progress bar
    with LLM(tiny_checkpoint("llama"), **TINY) as local:
        want = local.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_revision_and_offline_mode(hub, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    path = resolve_model_path("acme/tiny", "v1", cache_dir=cache)
    assert path.endswith(COMMIT_V1)
    with pytest.raises(ValueError, match="cannot download 'acme/tiny' \\(revision 'nope'\\)"):
        resolve_model_path("acme/tiny", "nope", cache_dir=cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    count = len(hub.requests)
    assert resolve_model_path("acme/tiny", "v1", cache_dir=cache) == path  # cached: no request
    assert len(hub.requests) == count
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        resolve_model_path("acme/tiny", "main", cache_dir=str(tmp_path / "empty"))
    assert len(hub.requests) == count
