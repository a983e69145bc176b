"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over a flat, unpadded token batch.

Every layer calls attention through ``torch.ops.kiln.attention``, which reads and writes the paged
KV cache; the forward itself is a pure function of ``input_ids`` and ``positions``.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.distributed import parallel_state
from kiln.distributed.layers import ParallelLMHead, VocabParallelEmbedding, gather_logits
from kiln.distributed.parallel_state import TensorParallel
from kiln.models.config import ModelConfig
from kiln.models.rotary import RotaryEmbedding
from kiln.models.weight_copy import copy_into
from kiln.ops.attention_op import attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.k_scale = self.v_scale = 1.0  # fp8 KV-cache scales (kiln.quant.kv_cache sets them)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, self.q_size + self.kv_size :].view(-1, kv_heads, d)
        if self.qk_norm:
            q, k = qkv[:, : self.q_size].view(-1, heads, d), qkv[:, self.q_size : -self.kv_size]
            qk = torch.cat([self.q_norm(q), self.k_norm(k.view(-1, kv_heads, d))], dim=1)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads + kv_heads, d)
        q, k = rotary(positions, qk).split([heads, kv_heads], dim=1)
        out = torch.empty_like(q)
        attention(q, k, v, out, self.layer_idx, self.scale, self.sliding_window, self.k_scale, self.v_scale)
        return parallel_state.all_reduce(self.o_proj(out.view(-1, self.q_size)), self.tp)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return parallel_state.all_reduce(self.down_proj(F.silu(gate) * up), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, tp)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, rotary):
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), rotary)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, self.rotary)
        return self.norm(hidden)


# checkpoint name suffix -> (kiln parameter suffix, shard index) for the fused projections
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Also serves Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm): they differ only in config flags.

    Under tensor parallelism (``tp``: this rank of its group) ``cfg`` holds one rank's head counts and
    intermediate size (``kiln/distributed/sharding.py``); o and down all-reduce over ``tp``, the
    vocabulary layers shard themselves."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = parallel_state.ONE_RANK):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.model = DecoderModel(cfg, tp)
        if not cfg.tie_word_embeddings:
            self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def logits_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_logits(F.linear(hidden, self.logits_weight()), self.config.vocab_size, self.tp)

    def _shard_range(self, param_name: str, shard: int) -> tuple[int, int]:
        cfg = self.config
        if "qkv_proj" in param_name:
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
        inter = cfg.intermediate_size
        return (shard * inter, (shard + 1) * inter)

    def checkpoint_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters ``load_weights`` fills, by name."""
        return dict(self.named_parameters())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor, str]]) -> None:
        """Copy ``(hf_name, tensor, source_file)`` triples into the parameters, fusing q/k/v and gate/up.

        Raises ValueError naming the tensor for unknown names and shape mismatches, and for
        parameters the checkpoint never provided.
        """
        params = self.checkpoint_parameters()
        expected = {(name, None) for name in params}
        for name in list(params):  # every tensor of a fused module (weight, bias, fp8 scales) has shards
            shards = 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 0
            if shards:
                expected -= {(name, None)}
                expected |= {(name, s) for s in range(shards)}
        loaded = set()
        source = "checkpoint"
        for ckpt_name, tensor, source in weights:
            if "rotary_emb" in ckpt_name:
                continue
            if ckpt_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            target, shard = ckpt_name, None
            for old, (new, index) in _FUSED.items():
                if f".{old}." in ckpt_name:
                    target, shard = ckpt_name.replace(old, new), index
                    break
            if target not in params:
                raise ValueError(
                    f"{source}: unexpected tensor {ckpt_name!r} (no matching parameter in kiln's model)"
                )
            param = params[target]
            dest = param.data
            if shard is not None:
                lo, hi = self._shard_range(target, shard)
                dest = dest[lo:hi]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(
                    f"{source}: tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            copy_into(dest, tensor)  # on the loader's copy threads when it runs them
            loaded.add((target, shard))
        missing = sorted({name for name, _ in expected - loaded})
        if missing:
            names = sorted(_checkpoint_name(name, shard) for name, shard in expected - loaded)
            more = " ..." if len(names) > 8 else ""
            raise ValueError(
                f"{source}: missing tensors for parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                f" (checkpoint names {names[:8]}{more})"
            )


def _checkpoint_name(param_name: str, shard: int | None) -> str:
    """The checkpoint tensor that fills ``param_name`` (shard ``shard`` of a fused parameter)."""
    for old, (new, index) in _FUSED.items():
        if shard == index and f".{new}." in param_name:
            return param_name.replace(new, old)
    return param_name
