"""The real SmolLM2-135M-Instruct with ``quantization="fp8"`` (fp8 weights per channel, fp8 activations
per token, CPU reference product): the greedy answer still says Paris and the log-likelihood of a fixed
text stays within 8% of the unquantized model's (measured: 2.2%; kv_cache_dtype="fp8" alone 0.15%,
both together 3.0%)."""

import pytest

from kiln import LLM, SamplingParams

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after the engineer "
    "Gustave Eiffel, whose company designed and built the tower for the 1889 World's Fair."
)
PARAMS = [SamplingParams(temperature=0, max_tokens=4), SamplingParams(max_tokens=1, prompt_logprobs=0)]


def answer_and_log_likelihood(path: str, **kwargs) -> tuple[str, float]:
    with LLM(path, enforce_eager=True, dtype="float32", **kwargs) as llm:
        answer, scored = llm.generate(["The capital of France is", TEXT], PARAMS, use_tqdm=False)
    assert len(scored.prompt_logprobs) == len(scored.prompt_token_ids) > 30
    log_likelihood = sum(next(iter(entry.values())).logprob for entry in scored.prompt_logprobs[1:])
    return answer.outputs[0].text, log_likelihood


@pytest.mark.slow
def test_fp8_smollm2_stays_close(smollm_gguf):
    text, ll_base = answer_and_log_likelihood(smollm_gguf)
    text_fp8, ll_fp8 = answer_and_log_likelihood(smollm_gguf, quantization="fp8")
    assert "Paris" in text and "Paris" in text_fp8
    assert ll_base < 0 and abs(ll_fp8 - ll_base) <= 0.08 * abs(ll_base)
