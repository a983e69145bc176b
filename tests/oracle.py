"""HF transformers as the oracle: greedy continuations and per-step log-softmax of the same checkpoint."""

import torch


def hf_greedy(model_dir: str, prompts_ids: list[list[int]], max_new_tokens: int, **gen_kwargs):
    """Per prompt: (generated ids, [log_softmax over vocab at each step])."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for ids in prompts_ids:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
                **gen_kwargs,
            )
        tokens = out.sequences[0, len(ids) :].tolist()
        logprobs = [step[0].float().log_softmax(-1) for step in out.logits]
        results.append((tokens, logprobs))
    return results


def assert_greedy_agrees(base, other, tol: float) -> int:
    """Two greedy completions (``logprobs`` >= 2 requested) of one prompt under different numerics
    (e.g. bf16 vs fp8): the same tokens with logprobs within ``tol`` until they part, and they part only
    where ``base``'s top tokens were within ``tol`` of each other, with ``other``'s token among them.
    Returns how many leading tokens agree."""
    n = min(len(base.token_ids), len(other.token_ids))
    same = next((i for i in range(n) if base.token_ids[i] != other.token_ids[i]), n)
    for i in range(same):
        tok = base.token_ids[i]
        assert abs(other.logprobs[i][tok].logprob - base.logprobs[i][tok].logprob) < tol, (i, tok)
    if same < n:
        top = base.logprobs[same]
        assert other.token_ids[same] in top, (same, other.token_ids[same], list(top))
        assert top[base.token_ids[same]].logprob - top[other.token_ids[same]].logprob < tol, same
    return same
