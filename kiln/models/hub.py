"""Find a checkpoint: a local directory, a local ``.gguf`` file, or a hub id, downloaded when not cached.

Downloads go through ``huggingface_hub.snapshot_download`` with a progress bar and fetch only what kiln
reads: safetensors weights (and their index), the config, the generation config and the tokenizer files.
"""

import os

from kiln import envs

ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]


def resolve_model_path(
    model: str, revision: str | None = None, cache_dir: str | None = None, token: bool | str | None = None
) -> str:
    """A local directory or ``.gguf`` file as given; a hub id (``org/name``) from the local Hugging Face
    cache, downloaded first when it is not there (unless ``HF_HUB_OFFLINE=1``)."""
    if os.path.isdir(model) or (model.endswith(".gguf") and os.path.isfile(model)):
        return model
    if model.endswith(".gguf"):
        raise ValueError(f"model: GGUF file {model!r} does not exist")
    if os.path.isabs(model) or model.startswith(".") or model.count("/") != 1:
        raise ValueError(f"model: directory {model!r} does not exist")
    from huggingface_hub import snapshot_download

    offline, endpoint = envs.hub_offline(), envs.hub_endpoint()
    common = dict(revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
    try:
        return snapshot_download(model, local_files_only=True, **common)
    except Exception as e:
        if offline:
            raise ValueError(
                f"model: {model!r} is not a local directory, a .gguf file, or a model in the local "
                f"Hugging Face "
                f"cache, and HF_HUB_OFFLINE=1 forbids downloading it: {e}"
            ) from e
    try:
        return snapshot_download(model, endpoint=endpoint, token=token, **common)
    except Exception as e:
        where = endpoint or "the Hugging Face hub"
        raise ValueError(f"model: cannot download {model!r} (revision {revision!r}) from {where}: {e}") from e
