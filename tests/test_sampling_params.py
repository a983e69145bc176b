"""Tests for SamplingParams validation and normalisation, the output classes and prompt parsing."""

import logging
import re

import pytest

from kiln.runtime.inputs import TextPrompt, TokensPrompt, parse_prompt
from kiln.runtime.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kiln.runtime.sampling_params import (
    MIN_RANDOM_TEMPERATURE,
    RequestOutputKind,
    SamplingParams,
    SamplingType,
)

# ---------------------------------------------------------------------------- defaults

EXPECTED_DEFAULTS = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "bad_words": None,
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "flat_logprobs": False,
    "detokenize": True,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "logits_processors": None,
    "include_stop_str_in_output": False,
    "truncate_prompt_tokens": None,
    "output_kind": RequestOutputKind.CUMULATIVE,
    "structured_outputs": None,
    "logit_bias": None,
    "allowed_token_ids": None,
    "extra_args": None,
}


def test_defaults():
    params = SamplingParams()
    for name, expected in EXPECTED_DEFAULTS.items():
        assert getattr(params, name) == expected, name
    assert params.all_stop_token_ids == set()
    assert params.sampling_type is SamplingType.RANDOM
    assert not params.is_greedy


def test_float_fields_are_stored_as_float():
    params = SamplingParams(temperature=1, top_p=1, presence_penalty=1, repetition_penalty=2)
    assert isinstance(params.temperature, float)
    assert isinstance(params.top_p, float)
    assert isinstance(params.presence_penalty, float)
    assert isinstance(params.repetition_penalty, float)


def test_request_output_kind_members():
    assert [k.name for k in RequestOutputKind] == ["CUMULATIVE", "DELTA", "FINAL_ONLY"]


# ---------------------------------------------------------------------------- validation errors

INVALID = [
    ({"n": 0}, "n", "0"),
    ({"n": -3}, "n", "-3"),
    ({"n": 1.5}, "n", "1.5"),
    ({"presence_penalty": -2.5}, "presence_penalty", "-2.5"),
    ({"presence_penalty": 2.01}, "presence_penalty", "2.01"),
    ({"frequency_penalty": 3.0}, "frequency_penalty", "3.0"),
    ({"frequency_penalty": -2.1}, "frequency_penalty", "-2.1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "0.0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "-1.0"),
    ({"temperature": -0.5}, "temperature", "-0.5"),
    ({"temperature": float("nan")}, "temperature", "nan"),
    ({"temperature": "hot"}, "temperature", "'hot'"),
    ({"top_p": 0.0}, "top_p", "0.0"),
    ({"top_p": 1.5}, "top_p", "1.5"),
    ({"top_p": -0.1}, "top_p", "-0.1"),
    ({"top_k": -2}, "top_k", "-2"),
    ({"top_k": 2.5}, "top_k", "2.5"),
    ({"min_p": -0.1}, "min_p", "-0.1"),
    ({"min_p": 1.1}, "min_p", "1.1"),
    ({"seed": 1.5}, "seed", "1.5"),
    ({"seed": "42"}, "seed", "'42'"),
    ({"max_tokens": 0}, "max_tokens", "0"),
    ({"max_tokens": -5}, "max_tokens", "-5"),
    ({"min_tokens": -1}, "min_tokens", "-1"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "20"),
    ({"logprobs": -2}, "logprobs", "-2"),
    ({"prompt_logprobs": -5}, "prompt_logprobs", "-5"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "0"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens", "-2"),
    ({"stop": ""}, "stop", "''"),
    ({"stop": ["ok", ""]}, "stop", "''"),
    ({"stop": "x", "detokenize": False}, "detokenize", "x"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids", "-1"),
    ({"bad_words": ["  "]}, "bad_words", "'  '"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "[]"),
    ({"logit_bias": {"a": 1.0}}, "logit_bias", "'a'"),
    ({"logits_processors": [3]}, "logits_processors", "3"),
    ({"output_kind": "delta"}, "output_kind", "'delta'"),
    ({"temperature": 0.0, "n": 2}, "n must be 1 when using greedy sampling", "2"),
]


@pytest.mark.parametrize(("kwargs", "field_name", "value"), INVALID, ids=[str(c[0]) for c in INVALID])
def test_invalid_values_raise(kwargs, field_name, value):
    with pytest.raises(ValueError, match=re.escape(field_name)) as info:
        SamplingParams(**kwargs)
    assert value in str(info.value)


def test_error_message_format():
    with pytest.raises(ValueError, match=r"^temperature must be non-negative.*, got -0\.5\.$"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(ValueError, match=r"^n must be 1 when using greedy sampling, got 3\.$"):
        SamplingParams(temperature=0.0, n=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"top_p": 1.0},
        {"top_p": 1e-3},
        {"top_k": 1},
        {"top_k": -1},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"max_tokens": None, "min_tokens": 100},
        {"max_tokens": 1, "min_tokens": 1},
        {"logprobs": 0, "prompt_logprobs": -1},
        {"truncate_prompt_tokens": -1},
        {"truncate_prompt_tokens": 1},
        {"seed": 0},
        {"n": 4, "temperature": 0.7},
        {"allowed_token_ids": [3, 4]},
    ],
)
def test_boundary_values_accepted(kwargs):
    SamplingParams(**kwargs)


# ---------------------------------------------------------------------------- normalisation


def test_stop_string_becomes_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_stop_token_ids_normalised():
    params = SamplingParams(stop_token_ids=(5, 7))
    assert params.stop_token_ids == [5, 7]
    assert params.all_stop_token_ids == {5, 7}
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_stop_list_is_copied():
    stops = ["a"]
    params = SamplingParams(stop=stops)
    stops.append("b")
    assert params.stop == ["a"]


def test_top_k_minus_one_means_no_limit():
    assert SamplingParams(top_k=-1).top_k == 0


def test_seed_minus_one_means_unseeded():
    params = SamplingParams(seed=-1)
    assert params.seed is None
    assert params.sampling_type is SamplingType.RANDOM


def test_bool_logprobs():
    assert SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(logprobs=False).logprobs is None
    assert SamplingParams(prompt_logprobs=True).prompt_logprobs == 1


def test_logit_bias_keys_become_ints():
    assert SamplingParams(logit_bias={"12": 1, 3: -2.5}).logit_bias == {12: 1.0, 3: -2.5}


def test_bad_words_string_becomes_list():
    assert SamplingParams(bad_words="nope").bad_words == ["nope"]


# ---------------------------------------------------------------------------- greedy handling


@pytest.mark.parametrize("temperature", [0.0, 0, 1e-6])
def test_greedy_resets_filters(temperature):
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=10, min_p=0.2)
    assert params.is_greedy
    assert params.sampling_type is SamplingType.GREEDY
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)


def test_random_keeps_filters():
    params = SamplingParams(temperature=0.8, top_p=0.5, top_k=10, min_p=0.2)
    assert (params.top_p, params.top_k, params.min_p) == (0.5, 10, 0.2)
    assert SamplingParams(temperature=0.8, seed=7).sampling_type is SamplingType.RANDOM_SEED


def test_tiny_temperature_is_raised(caplog):
    with caplog.at_level(logging.WARNING):
        params = SamplingParams(temperature=1e-3)
    assert params.temperature == MIN_RANDOM_TEMPERATURE
    assert not params.is_greedy
    assert "temperature" in caplog.text


# ---------------------------------------------------------------------------- engine hooks


def test_update_from_generation_config_adds_eos():
    params = SamplingParams(stop_token_ids=[9])
    params.update_from_generation_config({"eos_token_id": [2, 32000, 32001]}, eos_token_id=2)
    assert params.all_stop_token_ids == {2, 9, 32000, 32001}
    assert params.stop_token_ids == [9, 32000, 32001]


def test_update_from_generation_config_int_and_missing():
    params = SamplingParams()
    params.update_from_generation_config({"eos_token_id": 5}, eos_token_id=2)
    assert params.all_stop_token_ids == {2, 5}
    assert params.stop_token_ids == [5]
    params = SamplingParams()
    params.update_from_generation_config({}, eos_token_id=2)
    assert params.all_stop_token_ids == {2}
    assert params.stop_token_ids == []


def test_update_from_generation_config_ignore_eos():
    params = SamplingParams(ignore_eos=True)
    params.update_from_generation_config({"eos_token_id": [2, 7]}, eos_token_id=2)
    assert params.all_stop_token_ids == {2, 7}
    assert params.stop_token_ids == []


def test_output_text_buffer_length():
    assert SamplingParams().output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_from_optional_fills_defaults():
    params = SamplingParams.from_optional(temperature=None, top_k=None, max_tokens=None, seed=None, n=2)
    assert params.temperature == 1.0
    assert params.top_k == 0
    assert params.max_tokens is None
    assert params.n == 2


# ---------------------------------------------------------------------------- clone and repr


def test_clone_is_independent():
    def proc(token_ids, logits):
        return logits

    params = SamplingParams(stop=["a"], stop_token_ids=[1], logits_processors=[proc], extra_args={"k": [1]})
    copy = params.clone()
    assert copy == params and copy is not params
    copy.stop.append("b")
    copy.stop_token_ids.append(2)
    copy.all_stop_token_ids.add(3)
    copy.extra_args["k"].append(2)
    assert params.stop == ["a"]
    assert params.stop_token_ids == [1]
    assert params.all_stop_token_ids == {1}
    assert params.extra_args == {"k": [1]}
    assert copy.logits_processors[0] is proc


def test_sampling_params_repr():
    text = repr(SamplingParams(temperature=0.5, stop="x"))
    assert text.startswith("SamplingParams(n=1, ")
    assert "temperature=0.5" in text
    assert "stop=['x']" in text
    assert "output_kind=RequestOutputKind.CUMULATIVE" in text


# ---------------------------------------------------------------------------- outputs


def _completion(**overrides):
    values = dict(index=0, text="hi", token_ids=[1, 2], cumulative_logprob=-0.5, logprobs=None)
    values.update(overrides)
    return CompletionOutput(**values)


def test_completion_output_finished_and_repr():
    running = _completion()
    assert not running.finished()
    done = _completion(finish_reason="stop", stop_reason="###")
    assert done.finished()
    text = repr(done)
    assert text.startswith("CompletionOutput(index=0, text='hi', token_ids=[1, 2]")
    assert "finish_reason='stop'" in text and "stop_reason='###'" in text


def test_logprob_defaults():
    lp = Logprob(-1.25)
    assert (lp.logprob, lp.rank, lp.decoded_token) == (-1.25, None, None)


def test_request_output_repr_and_fields():
    metrics = RequestMetrics(arrival_time=1.0, first_token_time=1.5, finished_time=3.0)
    out = RequestOutput(
        request_id="0",
        prompt="Hello",
        prompt_token_ids=[1, 2],
        prompt_logprobs=[None, {2: Logprob(-0.1, rank=1, decoded_token="lo")}],
        outputs=[_completion(finish_reason="length")],
        finished=True,
        metrics=metrics,
    )
    text = repr(out)
    assert text.startswith("RequestOutput(request_id='0', prompt='Hello', prompt_token_ids=[1, 2]")
    assert "CompletionOutput(index=0" in text and "finished=True" in text
    assert out.num_cached_tokens is None and out.kv_transfer_params is None
    assert metrics.time_to_first_token == 0.5 and metrics.e2e_latency == 2.0
    assert RequestMetrics().time_to_first_token is None


def test_request_output_add_aggregates_deltas():
    first = RequestOutput(
        "r", "p", [1], None, [_completion(text="a", token_ids=[5], logprobs=[{5: Logprob(-1)}])], False
    )
    second = RequestOutput(
        "r",
        "p",
        [1],
        None,
        [
            _completion(
                text="b",
                token_ids=[6],
                logprobs=[{6: Logprob(-2)}],
                cumulative_logprob=-3.0,
                finish_reason="stop",
            ),
            _completion(index=1, text="z", token_ids=[9]),
        ],
        True,
    )
    first.add(second, aggregate=True)
    assert first.finished
    assert first.outputs[0].text == "ab" and first.outputs[0].token_ids == [5, 6]
    assert [list(d) for d in first.outputs[0].logprobs] == [[5], [6]]
    assert first.outputs[0].cumulative_logprob == -3.0 and first.outputs[0].finished()
    assert [c.index for c in first.outputs] == [0, 1]


def test_request_output_add_replaces_without_aggregate():
    first = RequestOutput("r", "p", [1], None, [_completion(text="a")], False)
    first.add(RequestOutput("r", "p", [1], None, [_completion(text="abc")], False), aggregate=False)
    assert first.outputs[0].text == "abc" and not first.finished


# ---------------------------------------------------------------------------- prompts


def test_parse_prompt():
    assert parse_prompt("hi") == TextPrompt(prompt="hi")
    tokens = TokensPrompt(prompt_token_ids=[1, 2, 3])
    assert parse_prompt(tokens) is tokens
    with pytest.raises(ValueError, match="prompt_token_ids"):
        parse_prompt({"prompt_token_ids": [1, "x"]})
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt({"text": "hi"})
    with pytest.raises(TypeError, match="list"):
        parse_prompt([1, 2])
