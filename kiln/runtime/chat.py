"""Chat rendering as vLLM does it: templates given as a file or a string, and message contents as plain
strings or OpenAI-style content parts (``"auto"`` picks the form the template iterates over)."""

import os
from typing import Any

CONTENT_FORMATS = ("auto", "string", "openai")
_TEXT_PARTS = ("text", "input_text")
_JINJA_CHARS = "{}\n"


def load_chat_template(template: str | os.PathLike | None) -> str | None:
    """A string naming a readable file is read; otherwise the string is the template itself (vLLM's
    rule). A string without any Jinja character that names no readable file is an error, not a template."""
    if template is None:
        return None
    text = os.fspath(template)
    try:
        with open(text, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError) as e:
        if not isinstance(template, str) or not any(c in text for c in _JINJA_CHARS):
            raise ValueError(
                f"chat_template: {text!r} looks like a file path, but it cannot be opened ({e})"
            ) from e
    return text


def detect_content_format(template: str | None) -> str:
    """``"openai"`` when the template loops over a message's ``content``, else ``"string"``."""
    if not template:
        return "string"
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter) and it.node is not None:  # e.g. message['content'] | list
            it = it.node
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content":
            return "openai"
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return "openai"
    return "string"


def _text_parts(content: list, where: str) -> list[str]:
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f"{where}: content part {j} must be a dict with a 'type', got {part!r}")
        if part["type"] not in _TEXT_PARTS:
            raise NotImplementedError(
                f"{where}: content part {j} has type {part['type']!r}; kiln has no multimodal models, "
                "so only text parts are accepted"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: content part {j} needs a string 'text', got {text!r}")
        texts.append(text)
    return texts


def normalise_conversation(conversation: Any, content_format: str, index: int) -> list[dict]:
    """Messages with contents in ``content_format``: ``"string"`` joins the text parts with newlines,
    ``"openai"`` turns every content into a list of ``{"type": "text", "text": ...}`` parts."""
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(
            f"messages[{index}]: a conversation is a list of message dicts, got {conversation!r}"
        )
    out = []
    for i, message in enumerate(conversation):
        where = f"conversation {index}, message {i}"
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"{where}: a message is a dict with a 'role', got {message!r}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            texts = None if content is None else [content]
        elif isinstance(content, (list, tuple)):
            texts = _text_parts(list(content), where)
        else:
            raise ValueError(f"{where}: content must be a string or a list of parts, got {content!r}")
        message = dict(message)
        if texts is not None:
            if content_format == "string":
                message["content"] = "\n".join(texts)
            else:
                message["content"] = [{"type": "text", "text": t} for t in texts]
        out.append(message)
    return out
