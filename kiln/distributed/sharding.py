"""How a checkpoint splits across tensor-parallel ranks.

q/k/v and gate/up are split by output rows (column-parallel), o and down by input columns
(row-parallel); the KV heads are split when ``num_kv_heads >= size`` and replicated (each rank holds
the one its query heads read) when fewer; embedding and lm_head are split by vocabulary rows, the
last shard padded with zero rows. Norms are replicated. Each rank reads only its slices from the
checkpoint (``checkpoint_slice``).
"""

from dataclasses import dataclass, replace

import torch

from kiln.models.config import ModelConfig

BACKENDS = ("mp", "ray")  # how ranks beyond 0 run (None and "uni" mean "mp"; "uni" only for one rank)


def check_executor_backend(backend, tp: int, dp: int) -> None:
    """ValueError for a ``distributed_executor_backend`` kiln does not run with these sizes."""
    if backend not in (None, "uni", "external_launcher", *BACKENDS):
        raise ValueError(f"distributed_executor_backend must be None, 'uni', 'mp' or 'ray', got {backend!r}")
    if backend == "uni" and isinstance(tp, int) and tp > 1:
        raise ValueError(
            f"distributed_executor_backend='uni' runs one process: tensor_parallel_size={tp} needs "
            "'mp' or 'ray'"
        )
    if backend == "ray" and isinstance(dp, int) and dp > 1:
        raise ValueError(
            f"data_parallel_size={dp} with distributed_executor_backend='ray': kiln's replicas are "
            "processes ('mp'); with Ray, scale out with Ray Data (examples/ray_data_offline.py)"
        )


def check_tensor_parallel(cfg: ModelConfig, size: int, backend, device: torch.device, dp: int = 1) -> None:
    """ValueError naming the numbers when ``size`` ranks (times ``dp`` replicas) cannot split this
    model on this machine."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    check_executor_backend(backend, size, dp)
    if size > 1:
        _check_divides(cfg, size)
    if device.type == "cuda" and size * dp > torch.cuda.device_count():
        times = f" x data_parallel_size={dp}" if dp > 1 else ""
        raise ValueError(
            f"tensor_parallel_size={size}{times} exceeds the {torch.cuda.device_count()} CUDA devices "
            "of this machine"
        )


def _check_divides(cfg: ModelConfig, size: int) -> None:
    if cfg.num_heads % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the model's {cfg.num_heads} attention heads"
        )
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(
            f"tensor_parallel_size={size} and the model's {kv} KV heads: one must divide the other"
        )
    if cfg.intermediate_size % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the model's intermediate size "
            f"{cfg.intermediate_size}"
        )


def check_data_parallel_features(size: int, pooling) -> None:
    """Data parallelism shards ``generate`` and ``chat``; a pooling model's methods are not sharded."""
    if size > 1 and pooling is not None:
        raise ValueError(
            f"data_parallel_size={size} with runner='pooling': kiln shards generate and chat only "
            "(use data_parallel_size=1)"
        )


def check_tensor_parallel_features(size: int, quantization, pooling, lora) -> None:
    """ValueError naming both settings for what a sharded model does not run yet: fp8 projections
    (their scales are not sharded), pooling models and LoRA adapters (built unsharded)."""
    if size == 1:
        return
    refused = []
    if quantization is not None:
        refused.append(f"quantization={quantization.method!r}")
    if pooling is not None:
        refused.append("runner='pooling'")
    if lora is not None:
        refused.append("enable_lora=True")
    if refused:
        raise ValueError(
            f"tensor_parallel_size={size} with {refused[0]}: kiln does not shard it yet "
            "(use tensor_parallel_size=1)"
        )


def vocab_rows(vocab_size: int, size: int) -> int:
    """Rows of the embedding / lm_head each rank holds."""
    return -(-vocab_size // size)


def local_kv_heads(num_kv_heads: int, size: int) -> int:
    return max(1, num_kv_heads // size)


def rank_model_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The shapes one rank's model and KV cache have (``vocab_size`` stays the model's: the vocab
    layers shard it themselves)."""
    if size == 1:
        return cfg
    return replace(
        cfg,
        num_heads=cfg.num_heads // size,
        num_kv_heads=local_kv_heads(cfg.num_kv_heads, size),
        intermediate_size=cfg.intermediate_size // size,
    )


@dataclass(frozen=True)
class Slice:
    dim: int
    start: int
    length: int
    padded: int  # rows the rank's parameter has (> length only for the last vocabulary shard)


def checkpoint_slice(name: str, cfg: ModelConfig, rank: int, size: int) -> Slice | None:
    """The part of checkpoint tensor ``name`` rank ``rank`` of ``size`` holds; None: all of it."""
    if size == 1:
        return None
    hd = cfg.head_dim
    q_local = cfg.num_heads // size * hd
    kv_heads = local_kv_heads(cfg.num_kv_heads, size)
    first_kv = rank * kv_heads if cfg.num_kv_heads >= size else rank * cfg.num_kv_heads // size
    inter = cfg.intermediate_size // size
    if ".self_attn.q_proj." in name:
        return Slice(0, rank * q_local, q_local, q_local)
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return Slice(0, first_kv * hd, kv_heads * hd, kv_heads * hd)
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return Slice(0, rank * inter, inter, inter)
    if name.endswith(".self_attn.o_proj.weight"):
        return Slice(1, rank * q_local, q_local, q_local)
    if name.endswith(".mlp.down_proj.weight"):
        return Slice(1, rank * inter, inter, inter)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = vocab_rows(cfg.vocab_size, size)
        start = min(rank * rows, cfg.vocab_size)
        return Slice(0, start, min(rows, cfg.vocab_size - start), rows)
    return None


def narrow(tensor: torch.Tensor, piece: Slice | None) -> torch.Tensor:
    """``piece`` of a tensor already in memory (GGUF, whose tensors are dequantized whole)."""
    if piece is None:
        return tensor
    return pad_rows(tensor.narrow(piece.dim, piece.start, piece.length).clone(), piece)


def pad_rows(tensor: torch.Tensor, piece: Slice) -> torch.Tensor:
    if piece.padded == piece.length:
        return tensor
    pad = torch.zeros((piece.padded - piece.length, *tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad])
