"""The LLM entrypoint's API surface: constructor parameters, prompt forms, stops, n, seeds, chat, errors."""

import json
import shutil
import warnings

import pytest
import torch
from oracle import hf_greedy

from kiln import LLM, SamplingParams, TextPrompt, TokensPrompt

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    # a fixed small KV cache, so that other LLMs built while this one lives still find GPU memory
    with LLM(
        tiny_checkpoint("llama"),
        enforce_eager=True,
        dtype="float32",
        max_model_len=128,
        kv_cache_memory_bytes=2**26,
    ) as llm:
        yield llm


def texts(outputs):
    return [o.outputs[0].text for o in outputs]


def test_swap_space_is_deprecated_and_ignored(tiny_checkpoint):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32", swap_space=4).shutdown()
    assert any(issubclass(w.category, DeprecationWarning) and "swap_space" in str(w.message) for w in caught)


def test_prompt_forms_and_order(llm):
    tok = llm.get_tokenizer()
    prompts = ["Hello there", "The weather today is", "A"]
    ids = [tok(p)["input_ids"] for p in prompts]
    expected = texts(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert texts(llm.generate(ids, GREEDY, use_tqdm=False)) == expected
    assert texts(llm.generate([TextPrompt(prompt=p) for p in prompts], GREEDY, use_tqdm=False)) == expected
    assert (
        texts(llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], GREEDY, use_tqdm=False))
        == expected
    )
    assert texts(llm.generate(prompts[1], GREEDY, use_tqdm=False)) == expected[1:2]
    assert texts(llm.generate(ids[2], GREEDY, use_tqdm=False)) == expected[2:]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [o.prompt_token_ids for o in outs] == ids
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)


def test_one_params_per_prompt(llm):
    outs = llm.generate(
        ["a", "b"], [SamplingParams(max_tokens=3), SamplingParams(max_tokens=5)], use_tqdm=False
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="got 3 for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False)


def test_bad_prompt_rejects_call_before_anything_runs(llm):
    too_long = list(range(100, 300))
    with pytest.raises(
        ValueError,
        match=r"prompt 1: the decoder prompt \(length 200\) is longer than the maximum model length of 128",
    ):
        llm.generate([[1, 2, 3], too_long], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**9]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


def test_truncate_prompt_tokens(llm):
    long = list(range(100, 300))
    out = llm.generate([long], SamplingParams(max_tokens=2, truncate_prompt_tokens=50), use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-50:]


def test_stop_strings(llm):
    base = llm.generate("The weather today is", GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    cut = base.index(stop)
    out = llm.generate(
        "The weather today is", SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (base[:cut], "stop", stop)
    out = llm.generate(
        "The weather today is",
        SamplingParams(temperature=0, max_tokens=12, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == base[: cut + len(stop)]


def test_stop_token_ids_and_eos(llm):
    base = llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    target = base[3]
    first = base.index(target)
    out = llm.generate(
        "Hi", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[target]), use_tqdm=False
    )[0].outputs[0]
    assert out.token_ids == base[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", target)
    out = llm.generate(
        "Hi",
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[target], min_tokens=first + 2),
        use_tqdm=False,
    )[0].outputs[0]
    assert target not in out.token_ids[: first + 2]
    engine = llm.llm_engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = {target}
    try:
        out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
        assert (out.token_ids, out.finish_reason, out.stop_reason) == (base[: first + 1], "stop", None)
        out = llm.generate(
            "Hi", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
        )[0].outputs[0]
        assert out.token_ids == base
    finally:
        engine.eos_token_ids = saved


def test_n_and_seed(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    out = llm.generate("Tell me", params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    crowded = llm.generate(
        ["x y z", "Tell me", "another prompt"],
        [SamplingParams(temperature=1.0, max_tokens=8), params, SamplingParams(max_tokens=3)],
        use_tqdm=False,
    )[1]
    assert [o.token_ids for o in crowded.outputs] == [o.token_ids for o in out.outputs]
    with pytest.raises(ValueError, match="n must be 1"):
        SamplingParams(n=2, temperature=0)


def test_prompt_logprobs_match_hf(llm, tiny_checkpoint):
    ids = llm.get_tokenizer()("The capital of France is a city")["input_ids"]
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[ids[pos]].logprob - ref[pos - 1, ids[pos]].item()) < 1e-3
        assert len(entry) in (2, 3)


def test_chunked_prompt_logprobs(tiny_checkpoint):
    with LLM(
        tiny_checkpoint("llama"), enforce_eager=True, dtype="float32", max_num_batched_tokens=5
    ) as small:
        ids = list(range(200, 223))
        got = small.generate([ids], SamplingParams(max_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32") as big:
        want = big.generate([ids], SamplingParams(max_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    assert len(got.prompt_logprobs) == len(ids)
    for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert list(a) == list(b)
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_chat(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == rendered
    assert (
        out.outputs[0].token_ids
        == llm.generate(
            {"prompt_token_ids": tok(rendered, add_special_tokens=False)["input_ids"]}, GREEDY, use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    two = llm.chat([messages, messages], GREEDY, use_tqdm=False)
    assert len(two) == 2
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(messages, GREEDY, continue_final_message=True)
    custom = llm.chat(messages, GREEDY, use_tqdm=False, chat_template="{{ messages[0]['content'] }}!")[0]
    assert custom.prompt == "What is the capital of France?!"


def test_generation_config_defaults(tmp_path, tiny_checkpoint):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), path)
    (path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 5})
    )
    with LLM(str(path), enforce_eager=True, dtype="float32") as llm:
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 0.9, 5)
        assert len(llm.generate("Hi", use_tqdm=False)[0].outputs[0].token_ids) <= 5


def test_reset_prefix_cache_and_cached_tokens(llm):
    ids = list(range(300, 340))
    llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache()
    assert llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 0


def test_tqdm_reports_progress(llm, capsys):
    llm.generate(["a", "b"], SamplingParams(max_tokens=2))
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err and "toks/s" in err


def test_skip_tokenizer_init(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, dtype="float32", skip_tokenizer_init=True) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, detokenize=False), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
        with pytest.raises(ValueError, match="tokenizer"):
            llm.generate("text", use_tqdm=False)


def test_mistral_sliding_window_matches_hf_beyond_window(tiny_checkpoint):
    path = tiny_checkpoint("mistral")  # sliding_window 24
    ids = list(range(1000, 1040))
    ref_tokens, _ = hf_greedy(path, [ids], 6)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(path, enforce_eager=True, dtype="float32") as llm:
        assert llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids == ref_tokens


def test_kv_cache_too_small_for_max_model_len(tiny_checkpoint):
    block_bytes = 2 * 2 * 16 * 2 * 32 * 2  # float16 on GPU, float32 on CPU: sized for the smaller case
    if not torch.cuda.is_available():
        block_bytes *= 2
    with pytest.raises(ValueError, match="max_model_len: 256 tokens do not fit in the KV cache"):
        LLM(
            tiny_checkpoint("llama"),
            enforce_eager=True,
            max_model_len=256,
            kv_cache_memory_bytes=4 * block_bytes,
        )
    with LLM(tiny_checkpoint("llama"), enforce_eager=True, kv_cache_memory_bytes=4 * block_bytes) as llm:
        assert llm.config.max_model_len == 64  # lowered to what the cache holds
        with pytest.raises(
            ValueError,
            match=r"prompt 0: the decoder prompt \(length 70\) is longer than the maximum model length of 64",
        ):
            llm.generate([list(range(70))], use_tqdm=False)
        out = llm.generate([list(range(60))], SamplingParams(max_tokens=20), use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.parametrize(
    "field, value",
    [("flat_logprobs", True), ("spaces_between_special_tokens", False)],
)
def test_unimplemented_sampling_fields_are_refused(llm, field, value):
    with pytest.raises(NotImplementedError, match=field):
        llm.generate("Hi", SamplingParams(**{field: value}), use_tqdm=False)


def test_eos_ids_from_generation_config_stop(tmp_path, tiny_checkpoint, llm):
    base = llm.generate("Hi", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    target = base[4]
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, target]}))
    with LLM(str(path), enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**26) as other:
        out = other.generate("Hi", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == base[: base.index(target) + 1]
        assert out.finish_reason == "stop"
        ignored = other.generate(
            "Hi", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
        )
        assert ignored[0].outputs[0].token_ids == base


def test_interrupted_generate_leaves_engine_clean(llm, monkeypatch):
    engine = llm.llm_engine
    expected = llm.generate(["a b c", "d e f"], GREEDY, use_tqdm=False)
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["x y", "z"] * 3, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.num_blocks
    again = llm.generate(["a b c", "d e f"], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]


def test_n_samples_with_a_tiny_kv_cache(tiny_checkpoint):
    """Siblings finishing while others wait for blocks: the engine keeps going until all are done."""
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True)
    kwargs = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=5 * block_bytes)
    with LLM(tiny_checkpoint("llama"), **kwargs) as llm:
        outs = llm.generate([list(range(100, 140)), list(range(200, 230))], params, use_tqdm=False)
        assert [len(o.outputs) for o in outs] == [3, 3]
        assert all(len(c.token_ids) == 20 for o in outs for c in o.outputs)
        assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_overlapped_and_synchronous_steps_agree_on_a_random_workload(tiny_checkpoint):
    """Greedy and seeded requests with stops, n > 1, chunking and preemption: same outputs either way."""
    import random

    rng = random.Random(0)
    prompts, params = [], []
    for i in range(12):
        prompts.append([rng.randrange(100, 5000) for _ in range(rng.randrange(1, 45))])
        kind = rng.choice(["greedy", "seeded", "n"])
        extra = dict(max_tokens=rng.randrange(1, 24), stop_token_ids=[rng.randrange(100, 5000)])
        if rng.random() < 0.5:
            extra["stop"] = [rng.choice(["e", "a", "in"])]
        if kind == "greedy":
            params.append(SamplingParams(temperature=0, **extra))
        elif kind == "seeded":
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=i, **extra))
        else:
            params.append(SamplingParams(n=2, temperature=1.0, top_k=50, seed=100 + i, **extra))
    block_bytes = 2 * 2 * 16 * 2 * 32 * 4
    kwargs = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=8 * block_bytes)
    with LLM(tiny_checkpoint("llama"), max_num_batched_tokens=40, max_num_seqs=6, **kwargs) as llm:
        engine = llm.llm_engine
        runs = []
        for overlap in (True, False):
            engine.async_scheduling = overlap
            llm.reset_prefix_cache()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            runs.append(
                [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]
            )
            assert engine.kv.num_free_blocks == engine.num_blocks
        assert engine.scheduler.num_preemptions > 0
    assert runs[0] == runs[1]
    assert any(reason == "stop" for out in runs[0] for _, _, reason, _ in out)
