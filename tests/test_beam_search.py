"""``LLM.beam_search`` against HF ``generate(num_beams=...)`` (no EOS: both searches agree) and against a
brute-force reference of vLLM's semantics (EOS candidates completed at any rank, score over prompt and
output length) on a model whose EOS is a frequent token; beams share their prefixes' KV blocks."""

import math

import pytest
import torch
import transformers
from conftest import make_tiny_checkpoint

from kiln import LLM, BeamSearchOutput, BeamSearchParams
from kiln.runtime.beam_search import beam_search_score

PROMPTS = ["The capital of France is", "Once upon a time there", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17"]


def make_llm(path, **kw):
    return LLM(
        path, enforce_eager=True, dtype="float32", max_model_len=128, kv_cache_memory_bytes=2**23, **kw
    )


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with make_llm(tiny_checkpoint("llama")) as llm:
        yield llm


@pytest.mark.parametrize("width,length_penalty", [(4, 1.0), (3, 0.5)])
def test_matches_hf_beam_search_without_eos(llm, tiny_checkpoint, width, length_penalty):
    max_tokens = 6
    params = BeamSearchParams(
        beam_width=width, max_tokens=max_tokens, ignore_eos=True, length_penalty=length_penalty
    )
    outs = llm.beam_search(PROMPTS, params)
    assert len(outs) == len(PROMPTS) and all(isinstance(o, BeamSearchOutput) for o in outs)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32)
    config = transformers.GenerationConfig(
        num_beams=width,
        num_return_sequences=width,
        max_new_tokens=max_tokens,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf.generate(ids, generation_config=config)
        want = ref.sequences.tolist()
        got = [seq.tokens for seq in out.sequences]
        assert got == want
        # HF's score is cum_logprob / output_length ** length_penalty
        hf_cum = (ref.sequences_scores * max_tokens**length_penalty).tolist()
        for seq, cum in zip(out.sequences, hf_cum):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
            assert seq.cum_logprob == pytest.approx(
                sum(d[t].logprob for d, t in zip(seq.logprobs, seq.tokens[-6:]))
            )
            assert seq.text == llm.tokenizer.decode(seq.tokens) and seq.finish_reason == "length"


def reference_vllm_beam_search(hf, prompt_ids, width, max_tokens, eos, length_penalty):
    """vLLM's algorithm, every candidate scored by a full forward of its tokens."""

    def key(beam):
        return beam_search_score(beam[0], beam[1], eos, length_penalty)

    beams, completed = [(list(prompt_ids), 0.0)], []
    for _ in range(max_tokens):
        if not beams:
            break
        new = []
        for tokens, cum in beams:
            with torch.no_grad():
                logits = hf(torch.tensor([tokens])).logits[0, -1]
            lp = torch.log_softmax(logits.double(), -1)
            top = lp.topk(2 * width)
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                (completed if token == eos else new).append((tokens + [token], cum + value))
        beams = sorted(new, key=key, reverse=True)[:width]
    return sorted(completed + beams, key=key, reverse=True)[:width]


def test_matches_vllm_semantics_with_a_frequent_eos(tmp_path, tokenizer_dir, llm):
    # the token the model most often ranks first after these prompts becomes EOS
    firsts = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=4, max_tokens=3, ignore_eos=True))
    counts: dict[int, int] = {}
    for out in firsts:
        for seq in out.sequences:
            for d in seq.logprobs:
                for t in d:
                    counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)
    path = make_tiny_checkpoint(str(tmp_path), "llama", tokenizer_dir, eos_token_id=eos)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with make_llm(path, skip_tokenizer_init=True) as eos_llm:
        prompts = [{"prompt_token_ids": llm.tokenizer(p).input_ids} for p in PROMPTS]
        saw_eos = False
        for width, lp in ((3, 1.0), (2, 2.0)):
            outs = eos_llm.beam_search(
                prompts, BeamSearchParams(beam_width=width, max_tokens=7, length_penalty=lp)
            )
            for prompt, out in zip(prompts, outs):
                want = reference_vllm_beam_search(hf, prompt["prompt_token_ids"], width, 7, eos, lp)
                assert [s.tokens for s in out.sequences] == [w[0] for w in want]
                for seq, (_, cum) in zip(out.sequences, want):
                    assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
                    assert seq.finish_reason == ("stop" if seq.tokens[-1] == eos else "length")
                    saw_eos |= seq.tokens[-1] == eos
                    assert seq.text is None  # no tokenizer
        assert saw_eos, "pick another EOS: no completed beam was returned"
        engine = eos_llm.llm_engine
        assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks


def test_beams_share_prefix_blocks_and_run_in_one_batch(llm):
    engine = llm.llm_engine
    steps = []
    inner = engine.worker.execute_model

    def spy(out):
        steps.append([(s.start, s.num_tokens) for s in out.scheduled])
        return inner(out)

    engine.worker.execute_model = spy
    llm.reset_prefix_cache()
    try:
        width, max_tokens = 4, 5
        llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True))
    finally:
        del engine.worker.execute_model
    block = llm.config.block_size
    longest = max(len(llm.tokenizer(p).input_ids) for p in PROMPTS)
    assert longest > block  # one prompt has a full block to share
    later = steps[1:]
    assert len(later) == max_tokens - 1  # one engine step per search step: every beam in one batch
    assert all(len(step) == width * len(PROMPTS) for step in later)
    for step in later:
        for start, num_tokens in step:
            assert num_tokens <= block and start % block == 0  # only the tail past the full blocks
    # the full blocks of every beam's prefix came from the cache
    assert sum(start for step in later for start, _ in step) >= len(later) * width * block
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_bad_input(llm):
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        BeamSearchParams(beam_width=2, max_tokens=-1)
    with pytest.raises(ValueError, match="params must be a BeamSearchParams"):
        llm.beam_search(PROMPTS, {"beam_width": 2})
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.beam_search(["fine", ""], BeamSearchParams(beam_width=2, max_tokens=2))
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks
    assert not math.isnan(beam_search_score([1, 2], -1.0, 2, 1.0))
