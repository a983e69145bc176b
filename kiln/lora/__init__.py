"""LoRA adapters served beside the base model: many adapters and base-model requests in one batch.

``request`` (``LoRARequest``), ``config`` (``LLM(enable_lora=...)`` settings), ``adapter`` (PEFT
directories read and checked against the model), ``layer`` (the projection wrapper adding the
adapter's delta), ``batch`` (per-token adapter slots in fixed buffers) and ``manager`` (the GPU slot
table, LRU over a CPU cache). The kernels are ``kiln/ops/lora_*.py``.
"""

from kiln.lora.request import LoRARequest

__all__ = ["LoRARequest"]
