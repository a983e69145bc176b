"""Pooling architectures kiln loads: each maps to the causal-LM family whose decoder it shares and
to the pooling it does natively (``convert="auto"``)."""

# architecture -> (decoder family, native convert)
POOLING_ARCHITECTURES = {
    "LlamaForSequenceClassification": ("LlamaForCausalLM", "classify"),
    "MistralForSequenceClassification": ("MistralForCausalLM", "classify"),
    "Qwen2ForSequenceClassification": ("Qwen2ForCausalLM", "classify"),
    "Qwen3ForSequenceClassification": ("Qwen3ForCausalLM", "classify"),
    "Qwen2ForRewardModel": ("Qwen2ForCausalLM", "reward"),
    "LlamaModel": ("LlamaForCausalLM", "embed"),
    "MistralModel": ("MistralForCausalLM", "embed"),
    "Qwen2Model": ("Qwen2ForCausalLM", "embed"),
    "Qwen3Model": ("Qwen3ForCausalLM", "embed"),
}


def decoder_family(architecture: str) -> str:
    """The causal-LM architecture whose decoder ``architecture`` uses (itself for causal LMs)."""
    return POOLING_ARCHITECTURES.get(architecture, (architecture,))[0]
