"""The slot table: LRU over slots no running sequence uses, swap-ins as copies into fixed tables, the
step's per-token slot buffers, and adapter-rooted prefix-cache hashes."""

import pytest
import torch
from lora_oracle import make_adapter

from kiln import LoRARequest
from kiln.bench.lora_adapters import write_random_adapter
from kiln.lora.config import LoRAConfig
from kiln.lora.layer import LoRALinear
from kiln.lora.manager import LoRAManager
from kiln.models.config import ModelConfig
from kiln.models.loader import build_model, read_config
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Sequence


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    base = tiny_checkpoint("llama")
    cfg = ModelConfig.from_dict(read_config(base))
    root = tmp_path_factory.mktemp("slots")
    names = ["attn-qv", "mlp-rslora", "all-seven"]
    requests = [
        LoRARequest(n, i + 1, make_adapter(base, str(root / n), n, seed=i)) for i, n in enumerate(names)
    ]
    return base, cfg, requests


def _manager(setup, **config):
    base, cfg, requests = setup
    model = build_model(base, cfg, torch.float32, torch.device("cpu"))
    manager = LoRAManager(LoRAConfig(**config), cfg, model, max_tokens=64)
    return model, manager, [manager.load(r) for r in requests]


def test_projections_wrapped_around_their_base_modules(setup):
    model, manager, _ = _manager(setup, max_loras=2, max_cpu_loras=3)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for module in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        assert isinstance(module, LoRALinear) and isinstance(module.base, torch.nn.Linear)
    assert attn.qkv_proj.lora_a.shape == (2, 3, 16, 128) and attn.qkv_proj.lora_b.shape == (
        2,
        128 + 64 + 64,
        16,
    )
    assert len(manager.wrappers) == 4 * len(model.model.layers)


def test_lru_over_slots_not_used_by_running_sequences(setup):
    model, manager, (a, b, c) = _manager(setup, max_loras=2, max_cpu_loras=3)
    qkv = model.model.layers[0].self_attn.qkv_proj
    a_table, b_table = qkv.lora_a.data_ptr(), qkv.lora_b.data_ptr()
    assert manager.admit(a, set()) and manager.admit(b, {a.id})
    assert (manager.slot_of(a), manager.slot_of(b)) == (0, 1)
    assert not manager.admit(c, {a.id, b.id})  # both slots in use: c waits
    assert manager.slot_of(c) == -1 and manager.num_swap_ins == 2
    assert manager.slot_for(a) == 0  # a scheduled: used more recently than b
    assert manager.admit(c, set())  # b's slot is the least recently used one
    assert (manager.slot_of(a), manager.slot_of(b), manager.slot_of(c)) == (0, -1, 1)
    torch.testing.assert_close(qkv.lora_a[1], c.weights[(0, "self_attn.qkv_proj")][0])
    torch.testing.assert_close(qkv.lora_b[1], c.weights[(0, "self_attn.qkv_proj")][1])
    # "attn-qv" targets only q and v: k's shard and the MLP projections of its slot are zero
    assert qkv.lora_a[0, 1].abs().sum() == 0 and qkv.lora_a[0, 0].abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.lora_b[0].abs().sum() == 0
    assert (qkv.lora_a.data_ptr(), qkv.lora_b.data_ptr()) == (a_table, b_table)  # copied in place


def test_step_slot_buffers(setup):
    """What the runner writes for a step: slots per token, and the tokens grouped by slot."""
    _, manager, (a, b, _) = _manager(setup, max_loras=2, max_cpu_loras=3)
    manager.admit(a, set())
    manager.admit(b, {a.id})
    batch = manager.batch
    batch.set([(manager.slot_for(b), 2), (-1, 1), (manager.slot_for(a), 3), (manager.slot_for(b), 1)])
    assert batch.token_slots[:7].tolist() == [1, 1, -1, 0, 0, 0, 1]
    assert (batch.token_slots[7:] == -1).all()
    assert batch.sorted_tokens[:6].tolist() == [3, 4, 5, 0, 1, 6]
    assert batch.slot_starts.tolist() == [0, 3, 6]
    batch.set([(-1, 4), (-1, 1)])
    assert (batch.token_slots == -1).all() and batch.slot_starts.tolist() == [0, 0, 0]
    with pytest.raises(RuntimeError, match="holds no slot"):
        manager.slot_for(manager.load(setup[2][2]))


def test_cpu_cache_is_lru_of_max_cpu_loras(setup):
    _, manager, adapters = _manager(setup, max_loras=1, max_cpu_loras=2)
    assert manager.list_loras() == {2, 3}  # the first of three loaded was evicted
    assert manager.load(setup[2][1]) is adapters[1]  # cached: the same object


def test_random_adapter_writer_loads(setup, tmp_path):
    base, cfg, _ = setup
    path = write_random_adapter(str(tmp_path / "r"), read_config(base), rank=8)
    model = build_model(base, cfg, torch.float32, torch.device("cpu"))
    manager = LoRAManager(LoRAConfig(max_loras=1, max_lora_rank=8), cfg, model, max_tokens=8)
    adapter = manager.load(LoRARequest("random", 9, path))
    assert adapter.rank == 8 and len(adapter.weights) == 4 * cfg.num_layers


def test_prefix_hashes_rooted_at_the_adapter(setup):
    _, _, (a, b, _) = _manager(setup, max_loras=2, max_cpu_loras=3)
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)

    def seq(adapter):
        s = Sequence(0, "r", 0, list(range(9)), SamplingParams(), 4)
        s.lora = adapter
        return s

    hashes = [kv._full_block_hashes(seq(x), 8) for x in (None, a, b, a)]
    assert hashes[1] == hashes[3]  # same adapter, same tokens: same blocks
    assert len({h[0] for h in hashes[:3]}) == 3 and len({h[1] for h in hashes[:3]}) == 3
