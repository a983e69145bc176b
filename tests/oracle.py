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
