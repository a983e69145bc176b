"""chat(): templates from files or strings, OpenAI-style content parts in the "string" / "openai" /
"auto" content formats, and tokenization_kwargs, as vLLM does them."""

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.chat import detect_content_format

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
STRING_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
OPENAI_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>"
    "{% for part in m['content'] %}[{{ part['type'] }}:{{ part['text'] }}]{% endfor %}\n{% endfor %}"
)
PARTS = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    kwargs = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24, max_model_len=256)
    with LLM(tiny_checkpoint("llama"), **kwargs) as llm:
        yield llm


def test_chat_template_file_is_read(tmp_path, tiny_checkpoint):
    file = tmp_path / "template.jinja"
    file.write_text(STRING_TEMPLATE)
    kwargs = dict(enforce_eager=True, dtype="float32", kv_cache_memory_bytes=2**24)
    messages = [{"role": "user", "content": "Hi"}]
    for template in (str(file), file):
        with LLM(tiny_checkpoint("llama"), chat_template=template, **kwargs) as llm:
            assert llm.chat(messages, GREEDY, use_tqdm=False)[0].prompt == "<user>Hi\n"
    with pytest.raises(ValueError, match="looks like a file path, but it cannot be opened"):
        LLM(tiny_checkpoint("llama"), chat_template=str(tmp_path / "missing.jinja"), **kwargs)


def test_chat_template_argument_of_chat_may_be_a_file(llm, tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text(STRING_TEMPLATE)
    out = llm.chat([{"role": "user", "content": "Yo"}], GREEDY, use_tqdm=False, chat_template=str(file))
    assert out[0].prompt == "<user>Yo\n"


def test_content_format_detection():
    assert detect_content_format(STRING_TEMPLATE) == "string"
    assert detect_content_format(OPENAI_TEMPLATE) == "openai"
    assert detect_content_format("{% for p in message.content %}{{ p.text }}{% endfor %}") == "openai"
    assert detect_content_format(None) == "string"


def test_content_parts_with_a_string_template_are_joined(llm):
    for fmt in ("auto", "string"):
        out = llm.chat(
            PARTS, GREEDY, use_tqdm=False, chat_template=STRING_TEMPLATE, chat_template_content_format=fmt
        )
        assert out[0].prompt == "<user>Hello\nthere\n"
    # the model's own template (SmolLM2's, string content) gets the joined text too
    tok = llm.get_tokenizer()
    joined = [{"role": "user", "content": "Hello\nthere"}]
    want = tok.apply_chat_template(joined, tokenize=False, add_generation_prompt=True)
    assert llm.chat(PARTS, GREEDY, use_tqdm=False)[0].prompt == want


def test_openai_format_gives_the_template_parts(llm):
    out = llm.chat(PARTS, GREEDY, use_tqdm=False, chat_template=OPENAI_TEMPLATE)  # auto detects openai
    assert out[0].prompt == "<user>[text:Hello][text:there]"  # trim_blocks eats the newline
    plain = [{"role": "user", "content": "Hi"}]
    out = llm.chat(
        plain, GREEDY, use_tqdm=False, chat_template=OPENAI_TEMPLATE, chat_template_content_format="openai"
    )
    assert out[0].prompt == "<user>[text:Hi]"


def test_non_text_parts_and_bad_formats_are_refused(llm):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(NotImplementedError, match="content part 0 has type 'image_url'"):
        llm.chat(image, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template_content_format must be one of"):
        llm.chat(PARTS, GREEDY, use_tqdm=False, chat_template_content_format="markdown")
    with pytest.raises(ValueError, match="content must be a string or a list of parts, got 5"):
        llm.chat([{"role": "user", "content": 5}], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_chat_honours_tokenization_kwargs(llm):
    messages = [{"role": "user", "content": "one two three four five six seven eight nine ten"}]
    full = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    cut = llm.chat(
        messages, GREEDY, use_tqdm=False, tokenization_kwargs={"truncation": True, "max_length": 5}
    )[0]
    assert cut.prompt_token_ids == full.prompt_token_ids[:5]
    with pytest.raises(ValueError, match="tokenization_kwargs: unknown key"):
        llm.chat(messages, GREEDY, use_tqdm=False, tokenization_kwargs={"max_len": 5})
