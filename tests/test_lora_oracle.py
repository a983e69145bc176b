"""kiln with LoRA vs peft's PeftModel on the same tiny fp32 checkpoints: three adapters (different
ranks, target sets, rsLoRA, rank/alpha patterns) mixed in one batch with base-model prompts; greedy
tokens identical per prompt and logprobs within 1e-3, whatever the batching, chunking, prefix caching,
preemption or compilation."""

import pytest
from lora_oracle import check_outputs, mixed_batch, peft_greedy, reference_cases

from kiln import LLM, SamplingParams

MAX_TOKENS = 8
LORA_KWARGS = dict(enable_lora=True, max_loras=3, max_lora_rank=16)


@pytest.fixture(scope="module")
def lora_references(tiny_checkpoint, tmp_path_factory):
    return reference_cases(tiny_checkpoint, tmp_path_factory, MAX_TOKENS)


def run_mixed(llm, ids, requests, refs):
    prompts, loras, keys = mixed_batch(ids, requests)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    check_outputs(outputs, keys, refs, loras)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks
    return outputs


def test_adapters_change_the_output(lora_references):
    """The oracle cases are not vacuous: every adapter moves the greedy tokens away from the base model's."""
    _, _, requests, refs = lora_references("llama")
    for name in requests:
        assert [t for t, _ in refs[name]] != [t for t, _ in refs[None]], name


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_mixed_adapters_match_peft(arch, lora_references):
    base, ids, requests, refs = lora_references(arch)
    with LLM(base, enforce_eager=True, dtype="float32", **LORA_KWARGS) as llm:
        run_mixed(llm, ids, requests, refs)


def test_fewer_slots_than_adapters(lora_references):
    """max_loras=1: sequences of other adapters wait for the slot; LRU swap-ins keep outputs exact."""
    base, ids, requests, refs = lora_references("llama")
    with LLM(
        base, enforce_eager=True, dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=2
    ) as llm:
        run_mixed(llm, ids, requests, refs)
        manager = llm.llm_engine.lora
        assert manager.num_swap_ins >= len(requests)
        assert len(manager.cpu_cache) <= 2


def test_prefix_cache_never_shared_across_adapters(lora_references):
    base, ids, requests, refs = lora_references("llama")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    prompt = [{"prompt_token_ids": ids[1]}]
    with LLM(base, enforce_eager=True, dtype="float32", block_size=4, **LORA_KWARGS) as llm:
        full_blocks = (len(ids[1]) - 1) // 4 * 4
        first = {}
        for name in [None, *requests]:
            lora = None if name is None else requests[name]
            (out,) = llm.generate(prompt, params, lora_request=lora, use_tqdm=False)
            first[name] = out.num_cached_tokens
            check_outputs([out], [(name, 1)], refs, [lora])
        assert all(cached == 0 for cached in first.values())  # same tokens, other adapter: no hit
        run_mixed(llm, ids, requests, refs)
        for name in [None, *requests]:  # same adapter again: its own blocks are reused
            lora = None if name is None else requests[name]
            (out,) = llm.generate(prompt, params, lora_request=lora, use_tqdm=False)
            assert out.num_cached_tokens == full_blocks
            check_outputs([out], [(name, 1)], refs, [lora])


def test_chunked_prefill(lora_references):
    base, ids, requests, refs = lora_references("qwen3")
    kwargs = dict(enforce_eager=True, dtype="float32", max_num_batched_tokens=8, max_num_seqs=3)
    with LLM(base, **kwargs, **LORA_KWARGS) as llm:
        run_mixed(llm, ids, requests, refs)


def test_preemption(lora_references):
    base, ids, requests, refs = lora_references("llama")
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4  # K+V, 2 layers, 16 slots, 2 kv heads, head_dim 32, fp32
    with LLM(
        base, enforce_eager=True, dtype="float32", kv_cache_memory_bytes=6 * block_bytes, **LORA_KWARGS
    ) as llm:
        run_mixed(llm, ids, requests, refs)
        assert llm.llm_engine.scheduler.num_preemptions > 0


def test_compiled(lora_references, tmp_path):
    """compilation_config=3 (piecewise Inductor): the LoRA ops stay opaque, everything else compiles;
    adapters loaded after start-up swap into the slots without any recompilation."""
    base, ids, requests, refs = lora_references("llama")
    config = {"mode": 3, "cache_dir": str(tmp_path)}
    with LLM(
        base, dtype="float32", compilation_config=config, max_num_batched_tokens=64, **LORA_KWARGS
    ) as llm:
        report = llm.compile_report()
        compiles = report.graphs_captured, report.unique_compiles
        run_mixed(llm, ids, requests, refs)
        report = llm.compile_report()
        assert (report.graphs_captured, report.unique_compiles) == compiles
        assert report.recompilations == 0


def test_chat_with_lora(lora_references):
    base, _, requests, _ = lora_references("llama")
    lora = requests["attn-qv"]
    messages = [{"role": "user", "content": "Hi there"}]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(base, enforce_eager=True, dtype="float32", **LORA_KWARGS) as llm:
        (chat,) = llm.chat(messages, params, use_tqdm=False, lora_request=lora)
        (plain,) = llm.generate(
            {"prompt_token_ids": chat.prompt_token_ids}, params, lora_request=lora, use_tqdm=False
        )
    ref = peft_greedy(base, lora.lora_path, [chat.prompt_token_ids], 4)[0][0]
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids == ref
    assert chat.lora_request is lora and chat.outputs[0].lora_request is lora


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_keeps_outputs_exact_under_the_wrappers(lora_references, level):
    """The wrappers keep the checkpoint's parameter names: wake_up after sleep(level=2) reloads the base
    weights by name; the A tables share the stacked weights' storage, so level 1 brings them back with
    the weights (no adapter copied in again) and level 2 empties the slots (adapters copied in again).
    Outputs stay exact either way."""
    base, ids, requests, refs = lora_references("llama")
    with LLM(base, enforce_eager=True, dtype="float32", **LORA_KWARGS) as llm:
        run_mixed(llm, ids, requests, refs)
        manager = llm.llm_engine.lora
        assert all(w.stacked for w in manager.wrappers.values())
        swap_ins = manager.num_swap_ins
        llm.sleep(level=level)
        llm.wake_up()
        run_mixed(llm, ids, requests, refs)
        assert (manager.num_swap_ins > swap_ins) == (level == 2)
