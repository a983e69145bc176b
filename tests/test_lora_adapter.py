"""Adapter loading and bad input: every problem is a ValueError naming the adapter and the reason,
raised before any request runs; the engine holds nothing afterwards and keeps serving."""

import json
import os
import shutil

import pytest
from conftest import make_tiny_checkpoint
from lora_oracle import make_adapter

from kiln import LLM, LoRARequest, SamplingParams
from kiln.lora.config import LoRAConfig
from kiln.runtime.engine_args import EngineArgs

PARAMS = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(base, str(root / name), name, seed=i)
        for i, name in enumerate(["attn-qv", "all-seven"])
    }


@pytest.fixture(scope="module")
def llm(base):
    with LLM(
        base, enforce_eager=True, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8
    ) as llm:
        yield llm


def _broken_copy(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    edit(str(dst))
    return str(dst)


def _edit_config(**fields):
    def edit(path):
        file = os.path.join(path, "adapter_config.json")
        with open(file) as f:
            config = json.load(f)
        config.update(fields)
        with open(file, "w") as f:
            json.dump(config, f)

    return edit


def _expect_refused(llm, request: LoRARequest, reason: str):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=reason) as info:
        llm.generate(["Hello", "World"], PARAMS, lora_request=[None, request], use_tqdm=False)
    assert repr(request.lora_name) in str(info.value)  # names the adapter
    assert not engine.has_unfinished_requests() and not engine.seqs
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert request.lora_int_id not in engine.lora.list_loras()
    (out,) = llm.generate("Hello", PARAMS, use_tqdm=False)  # still serving
    assert len(out.outputs[0].token_ids) == 3


def test_missing_directory(llm, tmp_path):
    _expect_refused(llm, LoRARequest("ghost", 11, str(tmp_path / "nope")), "not a directory")


def test_missing_files(llm, adapters, tmp_path):
    no_config = _broken_copy(
        adapters["attn-qv"], tmp_path / "a", lambda p: os.remove(f"{p}/adapter_config.json")
    )
    _expect_refused(llm, LoRARequest("no-config", 12, no_config), "no adapter_config.json")
    no_weights = _broken_copy(
        adapters["attn-qv"], tmp_path / "b", lambda p: os.remove(f"{p}/adapter_model.safetensors")
    )
    _expect_refused(llm, LoRARequest("no-weights", 13, no_weights), "no adapter_model.safetensors")


def test_malformed_files(llm, adapters, tmp_path):
    def garble(name):
        def edit(path):
            with open(os.path.join(path, name), "w") as f:
                f.write("{ not json")

        return edit

    bad_json = _broken_copy(adapters["attn-qv"], tmp_path / "a", garble("adapter_config.json"))
    _expect_refused(llm, LoRARequest("bad-json", 14, bad_json), "not valid JSON")
    bad_tensors = _broken_copy(adapters["attn-qv"], tmp_path / "b", garble("adapter_model.safetensors"))
    _expect_refused(llm, LoRARequest("bad-tensors", 15, bad_tensors), "cannot be read")


def test_rank_above_max_lora_rank(llm, adapters):
    _expect_refused(llm, LoRARequest("all-seven", 16, adapters["all-seven"]), "exceeds max_lora_rank=8")


def test_unsupported_targets(llm, adapters, tmp_path):
    lm_head = _broken_copy(
        adapters["attn-qv"], tmp_path / "a", _edit_config(target_modules=["q_proj", "lm_head"])
    )
    _expect_refused(llm, LoRARequest("lm-head", 17, lm_head), "lm_head adapters are not supported")
    saved = _broken_copy(adapters["attn-qv"], tmp_path / "b", _edit_config(modules_to_save=["embed_tokens"]))
    _expect_refused(llm, LoRARequest("saves-modules", 18, saved), "modules_to_save")
    dora = _broken_copy(adapters["attn-qv"], tmp_path / "c", _edit_config(use_dora=True))
    _expect_refused(llm, LoRARequest("dora", 19, dora), "use_dora=True is not supported")


def test_shapes_of_another_model(llm, tokenizer_dir, tmp_path):
    other = make_tiny_checkpoint(str(tmp_path / "other"), "llama", tokenizer_dir, hidden_size=64)
    path = make_adapter(other, str(tmp_path / "adapter"), "attn-qv", seed=0)
    _expect_refused(llm, LoRARequest("other-model", 20, path), "do not match the base model")


def test_reused_id_with_another_path(llm, adapters, tmp_path):
    llm.generate(
        "Hello", PARAMS, lora_request=LoRARequest("attn-qv", 21, adapters["attn-qv"]), use_tqdm=False
    )
    copy = shutil.copytree(adapters["attn-qv"], tmp_path / "copy")
    with pytest.raises(ValueError, match="lora_int_id 21 already names adapter 'attn-qv'"):
        llm.generate("Hello", PARAMS, lora_request=LoRARequest("other", 21, str(copy)), use_tqdm=False)


def test_lora_request_list_must_match_prompts(llm, adapters):
    lora = LoRARequest("attn-qv", 22, adapters["attn-qv"])
    with pytest.raises(ValueError, match="got 3 for 2 prompts"):
        llm.generate(["a", "b"], PARAMS, lora_request=[lora] * 3, use_tqdm=False)
    with pytest.raises(ValueError, match="must be a LoRARequest"):
        llm.generate(["a", "b"], PARAMS, lora_request=[lora, "x"], use_tqdm=False)


def test_lora_request_without_enable_lora(base, adapters):
    with LLM(base, enforce_eager=True, dtype="float32") as llm:
        with pytest.raises(ValueError, match="'attn-qv'.*enable_lora=True"):
            llm.generate(
                "Hi", PARAMS, lora_request=LoRARequest("attn-qv", 1, adapters["attn-qv"]), use_tqdm=False
            )
        assert not llm.llm_engine.has_unfinished_requests()
        assert llm.llm_engine.lora is None and not hasattr(
            llm.llm_engine.model.model.layers[0].mlp.down_proj, "base"
        )


def test_lora_request_fields():
    r = LoRARequest("name", 3, "/some/path")
    assert (r.adapter_id, r.name, r.path, r.base_model_name) == (3, "name", "/some/path", None)
    assert r == LoRARequest("name", 4, "/elsewhere") and hash(r) == hash("name")
    for bad in (0, -1, True, "1"):
        with pytest.raises(ValueError, match="lora_int_id must be an integer > 0"):
            LoRARequest("x", bad)


def _lora_config(**kwargs):
    values = dict(enable_lora=False, max_loras=1, max_lora_rank=16, max_cpu_loras=None) | kwargs
    return LoRAConfig.from_args(**values)


def test_engine_arguments():
    assert _lora_config(enable_lora=True) == LoRAConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=1)
    assert _lora_config() is None
    assert _lora_config(enable_lora=True, max_loras=4).max_cpu_loras == 4
    assert LoRAConfig(max_lora_rank=8).table_rank == 16 and LoRAConfig(max_lora_rank=48).table_rank == 64
    for name, value, reason in (
        ("max_loras", 0, "max_loras must be a positive integer"),
        ("max_lora_rank", 1.5, "max_lora_rank must be a positive integer"),
        ("max_cpu_loras", 0, "max_cpu_loras must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=reason):
            _lora_config(enable_lora=True, **{name: value})
        with pytest.raises(ValueError, match=reason):  # checked with the other engine arguments
            EngineArgs(model="x", enable_lora=True, **{name: value}).check()
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)"):
        _lora_config(enable_lora=True, max_loras=2, max_cpu_loras=1)
    with pytest.raises(NotImplementedError, match="fully_sharded_loras"):
        EngineArgs(model="x", enable_lora=True, fully_sharded_loras=True).check()
