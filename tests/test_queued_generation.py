"""``LLM.enqueue`` / ``enqueue_chat`` / ``wait_for_completion``: queued requests run together, in order."""

import pytest

from kiln import LLM, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["Hello, my name is", "The capital of France is", "One two three", [5, 6, 7, 8]]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(
        tiny_checkpoint("llama"),
        enforce_eager=True,
        dtype="float32",
        max_model_len=128,
        kv_cache_memory_bytes=2**24,
    ) as llm:
        yield llm


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def idle(llm):
    engine = llm.llm_engine
    return not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks


def test_enqueue_adds_without_running_and_wait_returns_in_order(llm):
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    first = llm.enqueue(PROMPTS[:2], GREEDY)
    second = llm.enqueue(PROMPTS[2:], [GREEDY, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])
    assert len(set(first + second)) == 4
    engine = llm.llm_engine
    assert engine.has_unfinished_requests()
    assert all(not s.output_token_ids for s in engine.seqs.values())  # nothing ran yet
    outs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outs] == first + second
    assert all(isinstance(o, RequestOutput) and o.finished for o in outs)
    assert tokens(outs[:3]) == tokens(expected[:3])
    assert outs[3].outputs[0].token_ids == expected[3].outputs[0].token_ids[:3]
    assert idle(llm)
    assert llm.wait_for_completion(use_tqdm=False) == []  # the queue is empty again


def test_generate_between_enqueue_and_wait_keeps_the_queued_outputs(llm):
    ids = llm.enqueue(PROMPTS[:2], GREEDY)
    mine = llm.generate(PROMPTS[2:3], GREEDY, use_tqdm=False)
    assert len(mine) == 1 and mine[0].request_id not in ids
    outs = llm.wait_for_completion(RequestOutput, use_tqdm=False)
    assert [o.request_id for o in outs] == ids
    assert tokens(outs) == tokens(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False))
    assert idle(llm)


def test_bad_input_adds_nothing(llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.enqueue(["fine", ""], GREEDY)
    with pytest.raises(ValueError, match="sampling_params: got 2 for 3 prompts"):
        llm.enqueue(PROMPTS[:3], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        llm.enqueue([list(range(5, 300))], GREEDY)
    assert idle(llm) and llm.wait_for_completion(use_tqdm=False) == []


def test_output_type_is_checked(llm):
    with pytest.raises(ValueError, match="output_type must be a type"):
        llm.wait_for_completion("RequestOutput", use_tqdm=False)
    llm.enqueue(PROMPTS[0], GREEDY)
    with pytest.raises(TypeError, match="output_type"):
        llm.wait_for_completion(int, use_tqdm=False)
    assert idle(llm)


def test_enqueue_chat_matches_chat(llm):
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    ]
    expected = llm.chat(conversations, GREEDY, use_tqdm=False)
    ids = llm.enqueue_chat(conversations, GREEDY)
    outs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outs] == ids
    assert [o.prompt for o in outs] == [o.prompt for o in expected]
    assert tokens(outs) == tokens(expected)
