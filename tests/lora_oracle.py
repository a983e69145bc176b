"""peft as the LoRA oracle: random adapters saved with ``save_pretrained``, and greedy continuations of
``PeftModel`` over the same base checkpoint."""

import torch

# name -> (rank, lora_alpha, target modules, extra LoraConfig fields)
ADAPTERS = {
    "attn-qv": (8, 16, ["q_proj", "v_proj"], {}),
    "mlp-rslora": (4, 8, ["o_proj", "gate_proj", "up_proj", "down_proj"], {"use_rslora": True}),
    "all-seven": (
        16,
        32,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        {"rank_pattern": {"k_proj": 4}, "alpha_pattern": {"down_proj": 8}},
    ),
}


def make_adapter(base_dir: str, out_dir: str, name: str, seed: int, std: float = 0.05) -> str:
    """A peft LoRA adapter of ``ADAPTERS[name]`` on ``base_dir`` with random A and B (peft starts B at
    zero, which would make the adapter a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rank, alpha, targets, extra = ADAPTERS[name]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(base_dir: str, adapter_dir: str | None, prompts_ids: list[list[int]], max_new_tokens: int):
    """Per prompt: (generated ids, [log_softmax over vocab at each step]) of the base model with the
    adapter applied by peft (the plain base model when ``adapter_dir`` is None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    results = []
    for ids in prompts_ids:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tokens = out.sequences[0, len(ids) :].tolist()
        results.append((tokens, [step[0].float().log_softmax(-1) for step in out.logits]))
    return results
