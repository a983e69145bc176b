"""EngineArgs: vLLM's argument names and defaults; what kiln honours, accepts, refuses and how it says so."""

import json
import shutil

import pytest
from oracle import hf_greedy

from kiln import LLM, EngineArgs, SamplingParams
from kiln.runtime.config import EngineConfig

TINY = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24)


def test_defaults_follow_vllm():
    args = EngineArgs()
    assert (args.max_logprobs, args.logprobs_mode, args.scheduling_policy) == (20, "raw_logprobs", "fcfs")
    assert (args.runner, args.convert, args.generation_config, args.tensor_parallel_size) == (
        "auto",
        "auto",
        "auto",
        1,
    )
    assert args.enable_chunked_prefill is None and args.distributed_executor_backend is None
    assert args.gpu_memory_utilization == 0.92 and args.seed == 0


@pytest.mark.parametrize(
    "name, suggestion",
    [("max_model_length", "max_model_len"), ("gpu_memory_utilisation", "gpu_memory_utilization")],
)
def test_misspelled_argument_is_a_type_error_with_a_suggestion(tiny_checkpoint, name, suggestion):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'; did you mean '{suggestion}'"):
        LLM(tiny_checkpoint("llama"), **{name: 1})


def test_argument_vllm_does_not_have_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'frobnicate'"):
        EngineArgs.from_kwargs("LLM", model="x", frobnicate=True)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"speculative_config": {"method": "ngram"}}, "speculative_config"),
        ({"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
        ({"enable_lora": True, "fully_sharded_loras": True}, "fully_sharded_loras"),
        ({"cpu_offload_gb": 4}, "cpu_offload_gb"),
        ({"offload_group_size": 2}, "offload_group_size"),
        ({"distributed_executor_backend": "external_launcher"}, "distributed_executor_backend"),
    ],
)
def test_features_kiln_lacks_are_refused_by_name(kwargs, name):
    with pytest.raises(NotImplementedError, match=name):
        EngineArgs(model="x", **kwargs).check()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in \\(0, 1\\], got 1.5"),
        ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer, got 0"),
        ({"max_logprobs": -2}, "max_logprobs must be .* got -2"),
        ({"logprobs_mode": "logits"}, "logprobs_mode must be one of .* got 'logits'"),
        ({"scheduling_policy": "lifo"}, "scheduling_policy must be one of .* got 'lifo'"),
        ({"attention_config": {"backend": "flash"}}, "attention_config backend"),
        ({"enable_chunked_prefill": "no"}, "enable_chunked_prefill must be True, False or None, got 'no'"),
        ({"hf_overrides": 3}, "hf_overrides must be a dict or a callable, got 3"),
        ({"generation_config": "/no/such/dir"}, "generation_config: '/no/such/dir'"),
        (
            {"enable_chunked_prefill": False, "max_model_len": 256, "max_num_batched_tokens": 64},
            "max_num_batched_tokens \\(64\\) is smaller than max_model_len \\(256\\)",
        ),
    ],
)
def test_bad_values_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model="x", **kwargs).check()


def test_defaults_and_harmless_values_are_accepted(tiny_checkpoint):
    accepted = dict(
        runner="generate",
        convert="none",
        offload_group_size=0,
        offload_num_in_group=1,
        offload_prefetch_step=1,
        offload_params=set(),
        cpu_offload_gb=0,
        disable_log_stats=False,
        distributed_executor_backend=None,
        enable_chunked_prefill=True,
        generation_config="vllm",
        max_logprobs=5,
        logprobs_mode="processed_logprobs",
        disable_custom_all_reduce=True,
        hf_overrides={},
        quantization=None,
    )
    with LLM(tiny_checkpoint("llama"), **TINY, **accepted) as llm:
        assert llm.config.max_logprobs == 5 and llm.config.logprobs_mode == "processed_logprobs"
        assert (
            len(llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
        )
    EngineArgs(model="x", distributed_executor_backend="mp").check()
    EngineArgs(model="x", distributed_executor_backend="ray", tensor_parallel_size=2).check()
    EngineArgs(model="x", data_parallel_size=2, tensor_parallel_size=2).check()


def test_max_model_len_above_the_model_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="max_model_len=100000 exceeds the model's max_position_embeddings"):
        LLM(tiny_checkpoint("llama"), max_model_len=100000)


def test_resolve_builds_the_engine_config(tiny_checkpoint):
    args = EngineArgs(
        model=tiny_checkpoint("llama"), max_model_len=64, max_num_seqs=3, max_logprobs=-1, **TINY
    )
    cfg = args.resolve().engine_config
    assert isinstance(cfg, EngineConfig)
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.max_logprobs, cfg.block_size) == (64, 3, -1, 16)
    assert cfg.enable_chunked_prefill and cfg.enable_prefix_caching and cfg.scheduling_policy == "fcfs"
    no_chunks = EngineArgs(model=tiny_checkpoint("llama"), enable_chunked_prefill=False, **TINY).resolve()
    assert no_chunks.engine_config.max_num_batched_tokens >= no_chunks.engine_config.max_model_len


def test_batch_limits_follow_the_device(tiny_checkpoint, monkeypatch):
    """Unset max_num_seqs / max_num_batched_tokens: 256 / 8192 on CPU and small GPUs, 1024 / 16384 on a
    GPU of 70 GiB or more; given values always win."""
    from kiln.runtime import engine_args

    cpu = EngineArgs(model=tiny_checkpoint("llama"), **TINY).resolve().engine_config
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (256, 8192)

    class Props:
        total_memory = 0

    monkeypatch.setattr(engine_args.torch.cuda, "get_device_properties", lambda device: Props)
    cuda = engine_args.torch.device("cuda")
    for gib, limits in ((80, (1024, 16384)), (70, (1024, 16384)), (48, (256, 8192))):
        Props.total_memory = gib * 2**30
        assert engine_args.default_batch_limits(cuda) == limits
    monkeypatch.setattr(engine_args, "default_batch_limits", lambda device: (1024, 16384))
    big = EngineArgs(model=tiny_checkpoint("llama"), **TINY).resolve().engine_config
    assert (big.max_num_seqs, big.max_num_batched_tokens) == (1024, 16384)
    given = EngineArgs(model=tiny_checkpoint("llama"), max_num_seqs=8, max_num_batched_tokens=512, **TINY)
    cfg = given.resolve().engine_config
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (8, 512)


def test_from_engine_args(tiny_checkpoint):
    args = EngineArgs(model=tiny_checkpoint("llama"), max_model_len=96, **TINY)
    with LLM.from_engine_args(args) as llm:
        assert llm.config.max_model_len == 96
        assert llm.engine_args is args
        assert (
            len(llm.generate("Hi", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids) == 3
        )


def test_hf_overrides_dict_and_callable_match_an_edited_checkpoint(tmp_path, tiny_checkpoint):
    """Oracle: HF transformers on a checkpoint whose config.json carries the override."""
    src = tiny_checkpoint("llama")
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (edited / "config.json").write_text(json.dumps(config))
    ids = list(range(200, 230))
    want, _ = hf_greedy(str(edited), [ids], 8)[0]
    baseline, _ = hf_greedy(src, [ids], 8)[0]
    assert want != baseline  # the override changes the model
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def set_eps(hf_config):
        hf_config.rms_norm_eps = 0.5
        return hf_config

    for overrides in ({"rms_norm_eps": 0.5}, set_eps):
        with LLM(src, hf_overrides=overrides, **TINY) as llm:
            assert llm.generate([ids], greedy, use_tqdm=False)[0].outputs[0].token_ids == want


def test_generation_config_sources(tmp_path, tiny_checkpoint):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 7}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    cases = [
        ({}, (0.6, 7)),
        ({"generation_config": "vllm"}, (1.0, 0)),
        ({"generation_config": str(other)}, (0.3, 0)),
        ({"override_generation_config": {"top_k": 3}}, (0.6, 3)),
    ]
    for kwargs, (temperature, top_k) in cases:
        with LLM(str(path), **TINY, **kwargs) as llm:
            params = llm.get_default_sampling_params()
            assert (params.temperature, params.top_k) == (temperature, top_k), kwargs
