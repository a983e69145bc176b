"""Where a PEFT target module lands in kiln's model: its fused projection, shard, and shapes."""

from kiln.models.config import ModelConfig

# HF module name -> (kiln projection, shard index within it)
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, list[int]]]:
    """kiln projection -> (input features, output features of each shard)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    return {
        "self_attn.qkv_proj": (hidden, [q, kv, kv]),
        "self_attn.o_proj": (q, [hidden]),
        "mlp.gate_up_proj": (hidden, [inter, inter]),
        "mlp.down_proj": (inter, [hidden]),
    }
