"""The LLM object itself: vLLM's import paths, repr, read-only config views, prefix-cache reset, shutdown."""

import pytest

from kiln import LLM, SamplingParams

TINY = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24, max_model_len=128)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), **TINY) as llm:
        yield llm


def test_vllm_import_paths_map_one_for_one():
    import kiln
    from kiln.inputs import PromptType, TextPrompt, TokensPrompt  # noqa: F401
    from kiln.outputs import CompletionOutput, Logprob, RequestOutput
    from kiln.sampling_params import RequestOutputKind, SamplingParams

    assert SamplingParams is kiln.SamplingParams and RequestOutputKind is kiln.RequestOutputKind
    assert (RequestOutput, CompletionOutput, Logprob) == (
        kiln.RequestOutput,
        kiln.CompletionOutput,
        kiln.Logprob,
    )
    assert (TextPrompt, TokensPrompt) == (kiln.TextPrompt, kiln.TokensPrompt)


def test_repr_names_model_and_engine_shape(llm, tiny_checkpoint):
    text = repr(llm)
    assert text.startswith("LLM(") and repr(tiny_checkpoint("llama")) in text
    assert "LlamaForCausalLM" in text and "max_model_len=128" in text and "dtype='float32'" in text


def test_model_config_views(llm, tiny_checkpoint):
    for view in (llm.model_config, llm.llm_engine.model_config):
        assert view.max_model_len == 128
        assert view.model == tiny_checkpoint("llama")
        assert view.runner_type == "generate"
        assert str(view.dtype) == "torch.float32"
        assert view.get_vocab_size() == view.vocab_size == view.hf_config.vocab_size
    with pytest.raises(AttributeError, match="read-only"):
        llm.model_config.max_model_len = 5
    assert llm.llm_engine.get_tokenizer() is llm.get_tokenizer()


def test_reset_prefix_cache_has_vllms_signature(llm):
    ids = list(range(300, 340))
    llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache(reset_running_requests=True, reset_connector=False) is True
    assert llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 0


def test_reset_running_requests_preempts_them(llm):
    engine = llm.llm_engine
    engine.add_request("x", None, list(range(100, 140)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert engine.scheduler.running
    assert not llm.reset_prefix_cache()  # blocks still held by the running request
    assert llm.reset_prefix_cache(reset_running_requests=True)
    assert not engine.scheduler.running and engine.kv.num_free_blocks == engine.num_blocks
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    assert [len(o.outputs[0].token_ids) for o in finished] == [4]  # recomputed, then finished


def test_every_method_after_shutdown_is_a_clear_runtime_error(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), **TINY)
    llm.shutdown()
    calls = {
        "generate": lambda: llm.generate("Hi"),
        "chat": lambda: llm.chat([{"role": "user", "content": "Hi"}]),
        "get_tokenizer": lambda: llm.get_tokenizer(),
        "reset_prefix_cache": lambda: llm.reset_prefix_cache(),
        "get_default_sampling_params": lambda: llm.get_default_sampling_params(),
        "compile_report": lambda: llm.compile_report(),
        "llm_engine": lambda: llm.llm_engine,
        "model_config": lambda: llm.model_config,
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"LLM.{name}: this LLM has been shut down"):
            call()
    llm.shutdown()  # a second shutdown is harmless
    assert "shut down" in repr(llm)
