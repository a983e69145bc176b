"""``LoRARequest``: which adapter a request runs with (vLLM's fields)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class LoRARequest:
    """A PEFT adapter directory under a name and an integer id.

    ``lora_int_id`` (> 0) identifies the adapter inside the engine: requests with the same id share one
    loaded copy and one prefix-cache namespace. Equality and hashing follow ``lora_name``, as in vLLM.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    tensorizer_config_dict: dict | None = None

    def __post_init__(self):
        if (
            not isinstance(self.lora_int_id, int)
            or isinstance(self.lora_int_id, bool)
            or self.lora_int_id < 1
        ):
            raise ValueError(
                f"LoRARequest {self.lora_name!r}: lora_int_id must be an integer > 0, got "
                f"{self.lora_int_id!r}"
            )
        if self.tensorizer_config_dict is not None:
            raise NotImplementedError(
                f"LoRARequest {self.lora_name!r}: kiln loads adapters from PEFT directories only "
                "(tensorizer_config_dict is not supported)"
            )

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)


def per_prompt(lora_request: Any, num_prompts: int) -> list[LoRARequest | None]:
    """``lora_request`` as given to ``generate``/``chat`` (None, one for all, or one per prompt)."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    if not isinstance(lora_request, Sequence) or isinstance(lora_request, (str, bytes)):
        raise ValueError(
            f"lora_request must be a LoRARequest, a list of them or None, got {type(lora_request).__name__}"
        )
    requests = list(lora_request)
    if len(requests) != num_prompts:
        raise ValueError(
            f"lora_request: got {len(requests)} for {num_prompts} prompts; pass one, or one per prompt"
        )
    for i, r in enumerate(requests):
        if r is not None and not isinstance(r, LoRARequest):
            raise ValueError(f"lora_request[{i}] must be a LoRARequest or None, got {type(r).__name__}")
    return requests
