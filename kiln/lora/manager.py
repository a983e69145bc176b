"""``LoRAManager``: adapters in host memory (LRU of ``max_cpu_loras``) and in the device slot table
(``max_loras`` slots, LRU among the slots no running sequence uses).

The engine asks it ``load`` (read and check an adapter before a request is accepted); the scheduler
``admit`` (can this waiting sequence run now: its adapter is in a slot, or a slot can take it) and
``slot_for`` (the slot each scheduled sequence's ``ScheduledSequence.lora_slot`` carries); the model
runner fills ``batch`` (the step's per-token slot buffers) from those slots. Moving an adapter into a
slot is a copy into the fixed tables, queued on the device stream behind the steps already launched:
nothing recompiles and no CUDA graph is recaptured.
"""

from collections import OrderedDict

import torch

from kiln.lora.adapter import LoRAAdapter, load_adapter
from kiln.lora.batch import LoRABatch
from kiln.lora.config import LoRAConfig
from kiln.lora.layer import wrap_projections
from kiln.lora.request import LoRARequest
from kiln.models.config import ModelConfig


class LoRAManager:
    def __init__(self, config: LoRAConfig, model_config: ModelConfig, model, max_tokens: int):
        self.config, self.model_config = config, model_config
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.batch = LoRABatch(max_tokens, config.max_loras, self.device)
        self.wrappers = wrap_projections(model, model_config, config, self.batch)
        self.cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.slot_adapter: list[int | None] = [None] * config.max_loras  # adapter id held by each slot
        self.slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(config.max_loras))
        self.num_swap_ins = 0

    # ------------------------------------------------------------------ host side

    def load(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of ``request``, read from disk unless cached; ValueError when it cannot serve."""
        cached = self.cpu_cache.get(request.lora_int_id)
        if cached is not None:
            if cached.request.lora_path != request.lora_path:
                raise ValueError(
                    f"LoRA adapter {request.lora_name!r}: lora_int_id {request.lora_int_id} already names "
                    f"adapter {cached.request.lora_name!r} at {cached.request.lora_path!r}"
                )
            self.cpu_cache.move_to_end(request.lora_int_id)
            return cached
        adapter = load_adapter(request, self.model_config, self.config, self.dtype)
        if self.device.type == "cuda":
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        self.cpu_cache[request.lora_int_id] = adapter
        while len(self.cpu_cache) > self.config.max_cpu_loras:
            self.cpu_cache.popitem(last=False)  # sequences using it keep their own reference
        return adapter

    def list_loras(self) -> set[int]:
        return set(self.cpu_cache)

    def remove(self, lora_id: int) -> bool:
        return self.cpu_cache.pop(lora_id, None) is not None

    # ------------------------------------------------------------------ device slots

    def slot_of(self, adapter: LoRAAdapter | None) -> int:
        if adapter is None:
            return -1
        try:
            return self.slot_adapter.index(adapter.id)
        except ValueError:
            return -1

    def admit(self, adapter: LoRAAdapter | None, running_adapters: set[int]) -> bool:
        """Make sure ``adapter`` holds a slot, evicting the least recently used slot that no running
        sequence uses; False when every slot is in use by running sequences."""
        if adapter is None or self.slot_of(adapter) >= 0:
            return True
        for slot in self.slot_lru:
            if self.slot_adapter[slot] not in running_adapters:
                self.swap_in(slot, adapter)
                return True
        return False

    @torch.inference_mode()
    def swap_in(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy ``adapter`` into ``slot`` (projections it does not target get zeros)."""
        for key, wrapper in self.wrappers.items():
            weights = adapter.weights.get(key)
            if weights is None:
                wrapper.lora_a[slot].zero_()
                wrapper.lora_b[slot].zero_()
            else:
                wrapper.lora_a[slot].copy_(weights[0], non_blocking=True)
                wrapper.lora_b[slot].copy_(weights[1], non_blocking=True)
        self.slot_adapter[slot] = adapter.id
        self.slot_lru.move_to_end(slot)
        self.num_swap_ins += 1

    @torch.inference_mode()
    def forget_slots(self) -> None:
        """Every slot empty (zeroed): their tables were lost (weights reloaded after a level-2 sleep);
        the next admission copies adapters in again."""
        for wrapper in self.wrappers.values():
            wrapper.lora_a.zero_()
            wrapper.lora_b.zero_()
        self.slot_adapter = [None] * self.config.max_loras

    def slot_for(self, adapter: LoRAAdapter) -> int:
        """The slot of a scheduled sequence's adapter (it holds one since admission), marked used."""
        slot = self.slot_of(adapter)
        if slot < 0:
            raise RuntimeError(f"LoRA adapter {adapter.request.lora_name!r} holds no slot")
        self.slot_lru.move_to_end(slot)
        return slot


def lora_manager_for(engine_config, model_config: ModelConfig, model) -> LoRAManager | None:
    """The engine's manager when ``enable_lora`` is on (wrapping the model's projections), else None.

    The slot buffers cover the largest token count any forward runs with: a scheduled step, a
    profiling or compile dummy run, a CUDA-graph bucket."""
    if engine_config.lora is None:
        return None
    from kiln.compiler.compiled_forward import CAPTURE_TOKENS
    from kiln.compiler.config import CompilationConfig

    cc = CompilationConfig.parse(engine_config.compilation_config)
    sizes = [
        engine_config.max_num_batched_tokens,
        engine_config.max_num_seqs,
        CAPTURE_TOKENS,
        4096,  # start-up attention warm-up steps
        *cc.compile_sizes,
        *(cc.cudagraph_capture_sizes or []),
    ]
    return LoRAManager(engine_config.lora, model_config, model, max(sizes))
