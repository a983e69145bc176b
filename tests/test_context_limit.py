"""The context limit as vLLM draws it: prompt + output may reach max_model_len; a prompt that leaves no
room for one output token is refused before anything runs."""

import pytest

from kiln import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32", max_model_len=64) as llm:
        yield llm


def test_prompt_and_output_reach_max_model_len(llm):
    params = SamplingParams(temperature=0, ignore_eos=True)
    outs = llm.generate([list(range(100, 163)), list(range(100, 159))], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 5]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    capped = llm.generate(
        [list(range(100, 160))], SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False
    )
    assert len(capped[0].outputs[0].token_ids) == 4


def test_prompt_without_room_for_output_is_refused(llm):
    with pytest.raises(
        ValueError, match=r"length 64\) plus the number of requested output tokens \(at least 1\)"
    ):
        llm.generate([[7, 8], list(range(100, 164))], use_tqdm=False)
    with pytest.raises(ValueError, match=r"length 65\) is longer than the maximum model length of 64"):
        llm.generate([list(range(100, 165))], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
