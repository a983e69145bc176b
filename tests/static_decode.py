"""A batch-1 greedy decode through the static size-1 compile with one GEMV fusion, and the same decode
eager: the shared set-up of the bf16 and fp8 GEMV end-to-end tests."""

import contextlib

from kiln import LLM, SamplingParams

PROMPT = {"prompt_token_ids": [5, 17, 300, 42, 9, 1000, 77]}


def static_and_eager(ckpt: str, cache_dir: str, fusion: str, eager_context=None, logprobs=2, **engine):
    """(compiled output, eager output, compile report) of 8 greedy tokens of one prompt. The static compile
    has ``compile_sizes=[1]`` and ``pass_config={fusion: True}``; the eager run happens inside
    ``eager_context`` (e.g. a patch that makes eager compute what the fused kernel computes)."""
    engine = dict(max_num_seqs=4, max_model_len=128, kv_cache_memory_bytes=16 * 2**20, **engine)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=logprobs)
    with eager_context or contextlib.nullcontext():
        with LLM(ckpt, enforce_eager=True, **engine) as llm:
            want = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    cfg = {"mode": "piecewise", "compile_sizes": [1], "cache_dir": cache_dir, "pass_config": {fusion: True}}
    with LLM(ckpt, compilation_config=cfg, **engine) as llm:
        got = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
        report = llm.compile_report()
    return got, want, report


def assert_same_greedy(got, want, tol: float) -> None:
    """The same tokens, and each chosen token's logprob within ``tol``."""
    assert got.token_ids == want.token_ids
    for step_got, step_want, t in zip(got.logprobs, want.logprobs, want.token_ids):
        assert abs(step_got[t].logprob - step_want[t].logprob) < tol
