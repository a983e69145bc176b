"""The architecture facts kiln's model code needs, read from an HF config dict (transformers 4.x or 5.x)."""

from dataclasses import dataclass, field

from kiln.pooling.architectures import POOLING_ARCHITECTURES, decoder_family

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int
    torch_dtype: str | None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES or a in POOLING_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"Unsupported architectures {archs!r} in config.json; "
                f"kiln supports {', '.join(ARCHITECTURES + tuple(POOLING_ARCHITECTURES))}."
            )
        family = decoder_family(arch)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else dict(rope, rope_type=rope_type)
        num_heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window") or 0
        if cfg.get("use_sliding_window") is False:
            window = 0
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=family == "Qwen3ForCausalLM",
            sliding_window=int(window),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            eos_token_id=[eos] if isinstance(eos, int) else list(eos or []),
            bos_token_id=cfg.get("bos_token_id"),
            raw=cfg,
        )
