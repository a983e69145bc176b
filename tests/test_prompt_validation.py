"""Requests are checked before anything runs (vLLM's input processing): prompt forms, multimodal keys,
cache salts, truncation and length limits, token ids against the vocabulary, tokenization arguments.
After every refused call the engine holds no request and no KV block."""

import pytest

from kiln import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    kwargs = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24, max_model_len=64)
    with LLM(tiny_checkpoint("llama"), **kwargs) as llm:
        yield llm


def assert_clean_and_usable(llm):
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not engine.processor.requests
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert len(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("key", ["multi_modal_data", "mm_processor_kwargs"])
def test_multimodal_prompt_keys_are_refused_by_name(llm, key):
    with pytest.raises(NotImplementedError, match=key):
        llm.generate(
            [{"prompt": "Hi"}, {"prompt": "Describe", key: {"image": object()}}], GREEDY, use_tqdm=False
        )
    assert_clean_and_usable(llm)


def test_cache_salt_separates_prefix_cache_blocks(llm):
    ids = list(range(400, 440))  # two full blocks of 16 and a tail
    llm.reset_prefix_cache()
    first = llm.generate([{"prompt_token_ids": ids, "cache_salt": "alice"}], GREEDY, use_tqdm=False)[0]
    same = llm.generate([{"prompt_token_ids": ids, "cache_salt": "alice"}], GREEDY, use_tqdm=False)[0]
    other = llm.generate([{"prompt_token_ids": ids, "cache_salt": "bob"}], GREEDY, use_tqdm=False)[0]
    unsalted = llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    assert (first.num_cached_tokens, same.num_cached_tokens) == (0, 32)
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert first.outputs[0].token_ids == same.outputs[0].token_ids == other.outputs[0].token_ids
    with pytest.raises(ValueError, match="cache_salt must be a non-empty str"):
        llm.generate([{"prompt_token_ids": ids, "cache_salt": 5}], GREEDY, use_tqdm=False)
    assert_clean_and_usable(llm)


def test_truncate_prompt_tokens_above_max_model_len_is_refused(llm):
    with pytest.raises(ValueError, match="truncate_prompt_tokens=65 is greater than max_model_len \\(64\\)"):
        llm.generate([[1, 2, 3]], SamplingParams(truncate_prompt_tokens=65), use_tqdm=False)
    out = llm.generate(
        [list(range(100, 200))], SamplingParams(max_tokens=1, truncate_prompt_tokens=60), use_tqdm=False
    )
    assert out[0].prompt_token_ids == list(range(140, 200))
    assert_clean_and_usable(llm)


def test_prompt_length_limits(llm):
    """vLLM: a prompt may not exceed max_model_len, and must leave room for one output token."""
    out = llm.generate([list(range(100, 163))], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    with pytest.raises(
        ValueError, match="decoder prompt \\(length 64\\) plus the number of requested output"
    ):
        llm.generate([list(range(100, 164))], GREEDY, use_tqdm=False)
    with pytest.raises(
        ValueError, match="decoder prompt \\(length 65\\) is longer than the maximum model length"
    ):
        llm.generate([list(range(100, 165))], GREEDY, use_tqdm=False)
    assert_clean_and_usable(llm)


@pytest.mark.parametrize(
    "field, params",
    [
        ("logit_bias", dict(logit_bias={10**6: 1.0})),
        ("allowed_token_ids", dict(allowed_token_ids=[1, 10**6])),
        ("stop_token_ids", dict(stop_token_ids=[10**6], min_tokens=2)),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_up_front(llm, field, params):
    with pytest.raises(
        ValueError, match=f"sampling_params\\[1\\].{field}: token ids \\[1000000\\] are outside"
    ):
        llm.generate(["a", "b"], [GREEDY, SamplingParams(max_tokens=4, **params)], use_tqdm=False)
    assert_clean_and_usable(llm)


def test_token_id_prompt_outside_the_vocabulary(llm):
    vocab = llm.model_config.get_vocab_size()
    with pytest.raises(ValueError, match=f"prompt 0: token ids \\[{vocab}\\] are outside the vocabulary"):
        llm.generate([[1, vocab]], GREEDY, use_tqdm=False)
    assert_clean_and_usable(llm)


@pytest.mark.parametrize("prompts", [None, 5, b"bytes"])
def test_prompts_of_the_wrong_type_name_the_argument(llm, prompts):
    with pytest.raises(ValueError, match="prompts must be a str, a TextPrompt / TokensPrompt dict"):
        llm.generate(prompts, GREEDY, use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stop": 5}, "stop must be a str or a list of str, got 5"),
        ({"stop_token_ids": 7}, "stop_token_ids must be a list of int, got 7"),
        ({"allowed_token_ids": 3}, "allowed_token_ids must be a list of int, got 3"),
    ],
)
def test_sampling_params_of_the_wrong_type_name_field_and_type(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_best_of_is_refused_by_name():
    with pytest.raises(TypeError, match="'best_of' was removed"):
        SamplingParams(n=2, best_of=3)


def test_tokenization_kwargs_are_honoured(llm):
    tok = llm.get_tokenizer()
    text = "one two three four five six seven eight nine ten"
    out = llm.generate(
        text, GREEDY, use_tqdm=False, tokenization_kwargs={"truncation": True, "max_length": 4}
    )[0]
    assert out.prompt_token_ids == tok(text, truncation=True, max_length=4)["input_ids"]
    assert len(out.prompt_token_ids) == 4
    plain = llm.generate(text, GREEDY, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False})[0]
    assert plain.prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="tokenization_kwargs: unknown key\\(s\\) \\['truncate'\\]"):
        llm.generate(text, GREEDY, use_tqdm=False, tokenization_kwargs={"truncate": True})
    assert_clean_and_usable(llm)


@pytest.mark.gpu
def test_out_of_vocabulary_ids_never_reach_the_device(tiny_checkpoint):
    """On CUDA an out-of-range index would be a device-side assert that kills the process."""
    with LLM(tiny_checkpoint("llama"), dtype="float16", kv_cache_memory_bytes=2**26, max_model_len=64) as llm:
        vocab = llm.model_config.get_vocab_size()
        bad = [
            SamplingParams(logit_bias={vocab: 1.0}),
            SamplingParams(allowed_token_ids=[vocab + 5]),
            SamplingParams(stop_token_ids=[vocab], min_tokens=2),
        ]
        for params in bad:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                llm.generate([[5, 6, 7]], params, use_tqdm=False)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[5, vocab]], GREEDY, use_tqdm=False)
        assert_clean_and_usable(llm)
