"""``kiln.inputs``: the import path of ``vllm.inputs``."""

from kiln.runtime.inputs import PromptType, TextPrompt, TokensPrompt

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
