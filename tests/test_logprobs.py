"""Logprobs as vLLM returns them: the max_logprobs limit, the four logprobs modes (HF transformers as the
oracle) and decoded_token (byte-fallback pieces repaired, None without detokenization)."""

import pytest
import torch

from kiln import LLM, SamplingParams

TINY = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24, max_model_len=128)
PROMPT = [49, 1000, 2000, 3000, 4000, 5000]
EMOJI = "\U0001f600"  # three byte-fallback tokens in SmolLM2's tokenizer, none a character on its own


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_max_logprobs_limits_requests(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), **TINY) as llm:  # default max_logprobs=20
        assert llm.model_config.max_logprobs == 20
        out = llm.generate([PROMPT], SamplingParams(max_tokens=1, logprobs=20), use_tqdm=False)[0].outputs[0]
        assert len(out.logprobs[0]) in (20, 21)
        for field, kind, value, shown in (
            ("logprobs", "sample", 21, 21),
            ("prompt_logprobs", "prompt", 25, 25),
            ("logprobs", "sample", -1, llm.model_config.get_vocab_size()),
        ):
            message = f"{field}: requested {kind} logprobs of {shown}, which is greater than max allowed: 20"
            with pytest.raises(ValueError, match=message):
                llm.generate([PROMPT], SamplingParams(max_tokens=1, **{field: value}), use_tqdm=False)
        assert not llm.llm_engine.has_unfinished_requests()


def test_max_logprobs_minus_one_allows_the_whole_vocabulary(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), max_logprobs=-1, **TINY) as llm:
        out = llm.generate("Hi", SamplingParams(max_tokens=2, logprobs=-1), use_tqdm=False)[0].outputs[0]
        vocab = llm.model_config.get_vocab_size()
        assert all(len(step) == vocab for step in out.logprobs)
        assert out.cumulative_logprob == pytest.approx(
            sum(s[t].logprob for s, t in zip(out.logprobs, out.token_ids))
        )


def _processed(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    scaled = logits / temperature
    kth = scaled.topk(top_k).values[-1]
    return scaled.masked_fill(scaled < kth, float("-inf"))


@pytest.mark.parametrize("mode", ["raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"])
def test_logprobs_modes_match_hf(tiny_checkpoint, hf_model, mode):
    params = SamplingParams(temperature=0.7, top_k=5, seed=3, max_tokens=4, logprobs=3, ignore_eos=True)
    with LLM(tiny_checkpoint("llama"), logprobs_mode=mode, **TINY) as llm:
        out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    logits = hf_logits(hf_model, PROMPT + out.token_ids)
    for i, token in enumerate(out.token_ids):
        row = logits[len(PROMPT) - 1 + i]
        if mode.startswith("processed"):
            row = _processed(row, 0.7, 5)
        want = row.log_softmax(-1) if mode.endswith("logprobs") else row
        entry = out.logprobs[i]
        assert entry[token].logprob == pytest.approx(want[token].item(), abs=1e-4)
        assert entry[token].rank == int((want > want[token]).sum()) + 1
        top = want.topk(3)
        by_rank = {lp.rank: (t, lp.logprob) for t, lp in entry.items() if t != token or lp.rank <= 3}
        for r, (value, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert by_rank[r][0] == tid and by_rank[r][1] == pytest.approx(value, abs=1e-4)


def test_decoded_token_repairs_byte_fallback_pieces(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), **TINY) as llm:
        tok = llm.get_tokenizer()
        first, second, last = tok(EMOJI, add_special_tokens=False)["input_ids"]
        assert all(tok.decode([t]) == "\ufffd" for t in (first, second, last))
        prompt = [49, first, second]  # "A" and the first two bytes of the emoji
        params = SamplingParams(max_tokens=1, logprobs=0, prompt_logprobs=0, allowed_token_ids=[last])
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == [last]
        assert out.outputs[0].logprobs[0][last].decoded_token == EMOJI  # completed from the preceding bytes
        assert out.outputs[0].text == EMOJI  # the prompt's trailing bytes complete the output's character
        assert out.prompt_logprobs[1][first].decoded_token == ""  # cannot be completed from what precedes
        assert out.prompt_logprobs[2][second].decoded_token == ""
        plain = llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=2), use_tqdm=False)[0].outputs[0]
        for step in plain.logprobs:
            assert all(
                lp.decoded_token == tok.decode([t])
                for t, lp in step.items()
                if "\ufffd" not in tok.decode([t])
            )


def test_decoded_token_is_none_without_detokenize(tiny_checkpoint):
    with LLM(tiny_checkpoint("llama"), **TINY) as llm:
        params = SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1, detokenize=False)
        out = llm.generate([PROMPT], params, use_tqdm=False)[0]
        assert out.outputs[0].text == ""
        assert all(lp.decoded_token is None for step in out.outputs[0].logprobs for lp in step.values())
        assert all(lp.decoded_token is None for step in out.prompt_logprobs[1:] for lp in step.values())
