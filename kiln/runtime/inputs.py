"""Prompt formats accepted by ``LLM.generate``.

A prompt is a plain string, a ``TextPrompt`` dict (``{"prompt": "..."}``) or a ``TokensPrompt`` dict
(``{"prompt_token_ids": [...]}``). ``parse_prompt`` turns any of them into one of the two dicts.
"""

from __future__ import annotations

from typing import Any, TypedDict


class _TextPromptBase(TypedDict):
    prompt: str


class TextPrompt(_TextPromptBase, total=False):
    """A prompt given as text, to be tokenized by the engine."""

    multi_modal_data: Any
    mm_processor_kwargs: dict[str, Any]
    cache_salt: str


class _TokensPromptBase(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokensPromptBase, total=False):
    """A prompt given as token ids; ``prompt`` may carry the matching text for the output."""

    prompt: str
    token_type_ids: list[int]
    multi_modal_data: Any
    mm_processor_kwargs: dict[str, Any]
    cache_salt: str


PromptType = str | TextPrompt | TokensPrompt


def parse_prompt(prompt: Any) -> TextPrompt | TokensPrompt:
    """Return ``prompt`` as a ``TextPrompt`` or ``TokensPrompt`` dict, checking its shape.

    Raises ``TypeError`` for anything that is not a string or a dict, and ``ValueError`` for a dict
    with neither ``prompt`` nor ``prompt_token_ids`` or with badly typed contents.
    """
    if isinstance(prompt, str):
        return TextPrompt(prompt=prompt)
    if not isinstance(prompt, dict):
        raise TypeError(
            f"prompt must be a str, a TextPrompt or a TokensPrompt dict, got {type(prompt).__name__}."
        )
    if "prompt_token_ids" in prompt:
        token_ids = prompt["prompt_token_ids"]
        if isinstance(token_ids, (str, bytes)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in token_ids
        ):
            raise ValueError(f"prompt_token_ids must be a list of ints, got {token_ids!r}.")
        if "prompt" in prompt and not isinstance(prompt["prompt"], str):
            raise ValueError(f"prompt must be a str, got {prompt['prompt']!r}.")
        return prompt  # type: ignore[return-value]
    if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
            raise ValueError(f"prompt must be a str, got {prompt['prompt']!r}.")
        return prompt  # type: ignore[return-value]
    raise ValueError(f"prompt dict needs a 'prompt' or 'prompt_token_ids' key, got keys {sorted(prompt)}.")
