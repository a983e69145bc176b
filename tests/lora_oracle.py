"""peft as the LoRA oracle: random adapters saved with ``save_pretrained``, and greedy continuations of
``PeftModel`` over the same base checkpoint."""

import torch

PROMPTS = [
    "Hello, my name is",
    "The capital of France is a city that has been",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]

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


def peft_greedy(
    base_dir: str,
    adapter_dir: str | None,
    prompts_ids: list[list[int]],
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """Per prompt: (generated ids, [log_softmax over vocab at each step]) of the base model with the
    adapter applied by peft (the plain base model when ``adapter_dir`` is None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)  # bf16 base: peft keeps LoRA in fp32
    model.to(device).eval()
    results = []
    for ids in prompts_ids:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tokens = out.sequences[0, len(ids) :].tolist()
        results.append((tokens, [step[0].float().log_softmax(-1).cpu() for step in out.logits]))
    return results


def reference_cases(tiny_checkpoint, tmp_path_factory, max_tokens: int, **peft_kwargs):
    """Factory: arch -> (base dir, prompt ids, {adapter name: LoRARequest}, {name or None: peft refs}),
    built once per arch."""
    from kiln import LoRARequest

    cache = {}

    def get(arch):
        if arch not in cache:
            from transformers import AutoTokenizer

            base = tiny_checkpoint(arch)
            ids = [AutoTokenizer.from_pretrained(base)(p)["input_ids"] for p in PROMPTS]
            requests, refs = {}, {None: peft_greedy(base, None, ids, max_tokens, **peft_kwargs)}
            for i, name in enumerate(ADAPTERS):
                path = make_adapter(base, str(tmp_path_factory.mktemp(f"{arch}-{name}")), name, seed=i)
                requests[name] = LoRARequest(name, i + 1, path)
                refs[name] = peft_greedy(base, path, ids, max_tokens, **peft_kwargs)
            cache[arch] = (base, ids, requests, refs)
        return cache[arch]

    return get


def mixed_batch(ids, requests):
    """Every prompt with every adapter and with none, interleaved: (prompts, lora_request list, keys)."""
    prompts, loras, keys = [], [], []
    for i, p in enumerate(ids):
        for name in [None, *requests]:
            prompts.append({"prompt_token_ids": p})
            loras.append(None if name is None else requests[name])
            keys.append((name, i))
    return prompts, loras, keys


def check_outputs(outputs, keys, refs, loras, logprob_tol=1e-3, tie_margin=0.0):
    """Greedy tokens equal to peft's and their logprobs within ``logprob_tol``. With ``tie_margin`` > 0
    (bf16), a token may differ where peft's two candidates are within ``tie_margin`` nats of each
    other; the comparison of that prompt ends there (the contexts differ from then on)."""
    for out, (name, i), lora in zip(outputs, keys, loras):
        assert out.lora_request is lora and out.outputs[0].lora_request is lora
        ref_tokens, ref_logprobs = refs[name][i]
        got = out.outputs[0]
        assert len(got.token_ids) == len(ref_tokens)
        for step, (token, entry) in enumerate(zip(got.token_ids, got.logprobs)):
            ref = ref_logprobs[step]
            if token != ref_tokens[step]:
                margin = (ref[ref_tokens[step]] - ref[token]).item()
                assert margin < tie_margin, (name, i, step, token, ref_tokens[step], margin)
                break
            assert abs(entry[token].logprob - ref[token].item()) < logprob_tol, (name, i, step)
