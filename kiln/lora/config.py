"""LoRA settings of ``LLM(enable_lora=True, max_loras=..., max_lora_rank=..., max_cpu_loras=...)``."""

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 1  # adapter slots on the device: distinct adapters in one batch
    max_lora_rank: int = 16  # largest adapter rank accepted; the slot tables are padded to it
    max_cpu_loras: int = 1  # adapters kept loaded in host memory (LRU)

    @property
    def table_rank(self) -> int:
        """Rank the device tables hold: ``max_lora_rank`` rounded up to a power of two, at least 16
        (the kernels' matrix-multiply tiles)."""
        return max(16, 1 << (self.max_lora_rank - 1).bit_length())

    @classmethod
    def from_args(cls, enable_lora, max_loras, max_lora_rank, max_cpu_loras) -> "LoRAConfig | None":
        """The LoRA fields of ``EngineArgs``, checked; None when ``enable_lora`` is off."""
        values = dict(
            enable_lora=enable_lora,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
        )
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = values[name]
            if value is None and name == "max_cpu_loras":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        max_cpu = values["max_cpu_loras"] or values["max_loras"]
        if max_cpu < values["max_loras"]:
            raise ValueError(f"max_cpu_loras ({max_cpu}) must be >= max_loras ({values['max_loras']})")
        if not values["enable_lora"]:
            return None
        return cls(values["max_loras"], values["max_lora_rank"], max_cpu)
