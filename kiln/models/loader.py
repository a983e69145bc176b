"""Read a checkpoint's config, build kiln's model on the target device and stream weights in."""

import glob
import json
import os
from collections.abc import Callable, Iterator

import torch

from kiln.distributed.parallel_state import ONE_RANK, TensorParallel
from kiln.distributed.sharding import Slice, narrow, pad_rows
from kiln.models.config import ModelConfig
from kiln.models.gguf import gguf_config, iter_gguf_tensors
from kiln.models.llama import LlamaForCausalLM
from kiln.models.safetensors_mmap import open_safetensors
from kiln.models.weight_copy import parallel_copies
from kiln.quant.apply import checkpoint_tensors, finish_model, prepare_model, quantize_model
from kiln.quant.config import QuantConfig

# checkpoint tensor name -> the slice this rank holds (None: all); tensor parallelism, sharding.py
ShardFn = Callable[[str], Slice | None]

MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def read_config(path: str, cache_root: str | None = None) -> dict:
    """The checkpoint's config dict; a GGUF file's is kept under ``cache_root`` when given."""
    if path.endswith(".gguf"):
        return gguf_config(path, cache_root)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"model: no config.json in {path!r}")
    with open(config_file) as f:
        return json.load(f)


def iter_safetensors(path: str, shard: ShardFn | None = None) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(name, tensor, file)`` one tensor at a time (single file or sharded with an index); each
    tensor is a view of the memory-mapped file (``safetensors_mmap.py``), so with ``shard`` only each
    tensor's slice is read from the file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in files]
        for file in files:
            if not os.path.isfile(file):
                raise ValueError(f"model: shard {file!r} listed in {index!r} is missing")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"model: no *.safetensors weights in {path!r}")
    for file in files:
        for name, tensor in open_safetensors(file):
            piece = shard(name) if shard is not None else None
            if piece is not None:  # a view of the rank's part (padded rows are a copy)
                tensor = pad_rows(tensor.narrow(piece.dim, piece.start, piece.length), piece)
            yield name, tensor, file


def build_model(
    path: str,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    pooling=None,
    quant: QuantConfig | None = None,
    shard: ShardFn | None = None,
    tp: TensorParallel = ONE_RANK,
) -> LlamaForCausalLM:
    """Allocate the model directly on ``device`` (no host copy) and load weights tensor by tensor.

    ``load_format="dummy"`` fills weights with small random values instead (for speed measurements).
    With a ``pooling`` spec (``kiln.pooling.spec.PoolingModelSpec``) the model is the decoder plus
    its pooling head instead of a causal LM. With ``quant`` the projections run in fp8 (``kiln.quant``):
    a pre-quantized checkpoint loads into fp8 modules; otherwise (and with dummy weights) the loaded
    weights are quantized. ``shard``: this rank's slice of each checkpoint tensor and ``tp`` the rank
    (tensor parallelism, which runs neither pooling nor ``quant``; ``cfg`` is the rank's).
    """
    serialized = quant is not None and quant.serialized and load_format != "dummy"
    with torch.device("meta"):
        if pooling is not None:
            from kiln.pooling.model import LlamaForPooling

            model = LlamaForPooling(cfg, pooling).to(dtype)
        else:
            model = MODEL_CLASSES[cfg.architecture](cfg, tp).to(dtype)
    if serialized:
        prepare_model(model, quant, dtype)
    model = _materialize(model, device)
    if serialized:
        weights = checkpoint_tensors(_checkpoint(path, cfg), model, quant)
        with torch.no_grad(), parallel_copies(device):
            model.load_weights(weights)
        finish_model(model)
    else:
        load_weights(model, path, cfg, load_format, shard=shard)
        if quant is not None:
            with torch.no_grad():
                quantize_model(model, quant)
    model.model.rotary.reset_cache()
    return model.eval()


def _materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model.to_empty(device=device)`` with ``torch.empty``: ``to_empty``'s ``empty_like`` of a meta
    tensor runs torch's Python reference, whose first call imports sympy and the symbolic-shapes
    machinery (1.5 s on a CPU). Tied parameters stay tied (``_apply`` replaces each tensor once)."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def load_weights(
    model: LlamaForCausalLM,
    path: str,
    cfg: ModelConfig,
    load_format: str = "auto",
    quant=None,
    shard: ShardFn | None = None,
) -> None:
    """Fill the model's existing parameter tensors from the checkpoint (or the dummy values). A quantized
    model (``quant``) is rebuilt the way ``build_model`` built it and its tensors copied in; ``shard``:
    this rank's slice of each checkpoint tensor (tensor parallelism)."""
    if quant is not None:
        first = next(model.parameters())
        fresh = build_model(path, cfg, model.model.norm.weight.dtype, first.device, load_format, quant=quant)
        with torch.no_grad():
            for (name, p), (fresh_name, q) in zip(model.named_parameters(), fresh.named_parameters()):
                assert name == fresh_name
                p.copy_(q)
        return
    if load_format == "dummy":
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        return
    with torch.no_grad(), parallel_copies(next(model.parameters()).device):
        model.load_weights(_checkpoint(path, cfg, shard))


def _checkpoint(path: str, cfg: ModelConfig, shard: ShardFn | None = None):
    """The checkpoint's tensors (with ``shard``: this rank's slices; a GGUF's are dequantized whole,
    then narrowed)."""
    if not path.endswith(".gguf"):
        return iter_safetensors(path, shard)
    weights = iter_gguf_tensors(path, cfg.raw)
    if shard is None:
        return weights
    return ((name, narrow(t, shard(name)), src) for name, t, src in weights)
