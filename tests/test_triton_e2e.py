"""LLM.generate with the Triton attention backend gives the reference backend's greedy tokens.

On CPU the kernels run under Triton's interpreter (set by conftest); on GPU they run for real.
"""

import pytest
import torch

from kiln import LLM, SamplingParams

PROMPTS = [list(range(200, 237)), [5, 6, 7], list(range(900, 917)), list(range(200, 230)) + [11, 12]]


def _generate(path, backend, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    with LLM(
        path, enforce_eager=True, dtype="float32", attention_config={"backend": backend}, **kwargs
    ) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [
        (
            o.outputs[0].token_ids,
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
        )
        for o in outs
    ]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_triton_backend_matches_reference(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    # small token budget and blocks: chunked prefill, prefix-cache hits mid-sequence and mixed batches
    kwargs = dict(max_num_batched_tokens=24, block_size=8)
    expected = _generate(path, "torch", **kwargs)
    got = _generate(path, "triton", **kwargs)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4)
