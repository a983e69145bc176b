"""``kiln.runtime.heap.heap_frozen`` around an engine run: the heap alive when ``generate`` starts
sits out the collector while it steps, and the collector is left as it was found."""

import gc

import pytest
from conftest import tiny_engine_kwargs

from kiln import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    llm = LLM(**tiny_engine_kwargs(tiny_checkpoint("llama")))
    yield llm
    llm.shutdown()


def test_generate_steps_with_the_heap_frozen_and_leaves_it_as_found(llm):
    counts = []
    step = llm.llm_engine.step

    def counting_step():
        counts.append(gc.get_freeze_count())
        return step()

    llm.llm_engine.step = counting_step
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    try:
        assert gc.get_freeze_count() == 0
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
        assert counts and all(c > 0 for c in counts)  # the model, modules, ... frozen while stepping
        assert gc.get_freeze_count() == 0
        gc.freeze()  # a caller's own frozen heap stays frozen
        try:
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
            assert gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()
    finally:
        del llm.llm_engine.step


def test_an_interrupted_run_unfreezes_the_heap(llm):
    step = llm.llm_engine.step

    def failing_step():
        raise KeyboardInterrupt

    llm.llm_engine.step = failing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.llm_engine.step = step
        del llm.llm_engine.step
    assert gc.get_freeze_count() == 0
    assert (
        len(llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False))
        == 1
    )
