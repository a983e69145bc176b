"""bad_words (vLLM's semantics) and vocabulary checks of logit_bias / allowed_token_ids."""

import pytest
from transformers import AutoTokenizer

from kiln import LLM, SamplingParams
from kiln.runtime.sampler import SamplingRow, banned_words


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(
        tiny_checkpoint("llama"), dtype="float32", max_model_len=128, kv_cache_memory_bytes=2**24
    ) as llm:
        yield llm


def test_words_are_encoded_alone_and_after_a_space(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    params = SamplingParams(bad_words=["hello", " world"])
    params.update_from_tokenizer(tok)
    expected = [tok.encode("hello", add_special_tokens=False), tok.encode(" hello", add_special_tokens=False)]
    expected += [
        tok.encode("world", add_special_tokens=False),
        tok.encode(" world", add_special_tokens=False),
    ]
    # a prefixed form joins only when it starts with another token and has as many tokens (vLLM)
    assert params.bad_words_token_ids == [
        ids
        for i, ids in enumerate(expected)
        if i % 2 == 0 or (ids[0] != expected[i - 1][0] and len(ids) == len(expected[i - 1]))
    ]


def test_the_last_token_is_banned_after_the_others():
    params = SamplingParams()
    params.bad_words_token_ids = [[7], [3, 4, 5]]
    assert banned_words(SamplingRow(params, output_token_ids=[9, 3, 4])) == [7, 5]
    assert banned_words(SamplingRow(params, output_token_ids=[9, 3])) == [7]
    assert banned_words(SamplingRow(params, output_token_ids=[4])) == [7]


def test_a_banned_word_never_appears(llm):
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = llm.generate("The story begins", greedy, use_tqdm=False)[0].outputs[0]
    ids = plain.token_ids
    # ban a two-token word of the output (so the prefix rule is exercised) that encodes back to itself
    for i in range(3, len(ids) - 2):
        word = tok.decode(ids[i : i + 2])
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, bad_words=[word])
        params.update_from_tokenizer(tok)
        if ids[i : i + 2] in params.bad_words_token_ids:
            break
    else:
        pytest.fail("no two-token word of the output encodes back to itself")
    out = llm.generate("The story begins", params, use_tqdm=False)[0].outputs[0]
    banned = params.clone()
    llm.llm_engine.validate_params(banned)
    for seq in banned.bad_words_token_ids:
        n = len(seq)
        assert all(out.token_ids[i : i + n] != seq for i in range(len(out.token_ids) - n + 1)), (word, seq)
    first = next(
        i
        for i in range(len(ids))
        if any(ids[i - len(s) + 1 : i + 1] == s for s in banned.bad_words_token_ids)
    )
    assert out.token_ids[:first] == ids[:first] and out.token_ids[first] != ids[first]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logit_bias": {10**6: 1.0}}, r"logit_bias: token ids \[1000000\] are outside the vocabulary"),
        ({"logit_bias": {-1: 1.0}}, r"logit_bias: token ids \[-1\] are outside"),
        ({"allowed_token_ids": [1, 10**6]}, r"allowed_token_ids: token ids \[1000000\] are outside"),
    ],
)
def test_ids_outside_the_vocabulary_are_refused_before_anything_runs(llm, kwargs, message):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=message):
        llm.generate(
            ["a", "b"], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, **kwargs)], use_tqdm=False
        )
    assert not engine.seqs and not engine.processor.requests
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert (
        len(
            llm.generate("a", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
            .outputs[0]
            .token_ids
        )
        == 2
    )
