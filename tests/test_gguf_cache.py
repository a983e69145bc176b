"""A GGUF file's config and tokenizer are built once and read from kiln's cache afterwards; the cached
ones equal transformers' own parse and conversion (the oracle)."""

import os

import pytest

from kiln.models import gguf
from kiln.runtime import gguf_tokenizer
from kiln.runtime.gguf_tokenizer import entry_dir, load_gguf_tokenizer

TEXTS = ["The capital of France is", "def fibonacci(n):\n    return n", "  spaces\tand ünïcödé 🙂", ""]


@pytest.fixture(scope="module")
def converted(smollm_gguf):
    from transformers import AutoTokenizer

    folder, name = os.path.dirname(smollm_gguf), os.path.basename(smollm_gguf)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)


def _same(a, b):
    assert type(a) is type(b) and len(a) == len(b) and a.get_vocab() == b.get_vocab()
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template", "name_or_path")
    for attr in attrs:
        assert getattr(a, attr) == getattr(b, attr), attr
    for text in TEXTS:
        ids = a(text)["input_ids"]
        assert b(text)["input_ids"] == ids and b.decode(ids) == a.decode(ids)
    chat = [{"role": "user", "content": "Hi"}]
    assert b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == a.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )


def test_converted_once_then_loaded_from_the_cache(smollm_gguf, converted, tmp_path, monkeypatch):
    first = load_gguf_tokenizer(smollm_gguf, str(tmp_path), local_files_only=True)
    entry = entry_dir(str(tmp_path), smollm_gguf)
    assert os.path.isfile(os.path.join(entry, "tokenizer_config.json"))
    assert not [p for p in os.listdir(os.path.dirname(entry)) if ".tmp-" in p]  # no half-written copy left
    _same(converted, first)

    from transformers import AutoTokenizer

    calls = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append(k) or real(*a, **k))
    second = load_gguf_tokenizer(smollm_gguf, str(tmp_path), local_files_only=True)
    assert len(calls) == 1 and "gguf_file" not in calls[0]  # the saved tokenizer, no conversion
    _same(converted, second)


def test_key_follows_the_file_and_a_damaged_entry_converts_again(smollm_gguf, converted, tmp_path):
    entry = entry_dir(str(tmp_path), smollm_gguf)
    os.makedirs(entry)
    with open(os.path.join(entry, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    _same(converted, load_gguf_tokenizer(smollm_gguf, str(tmp_path), local_files_only=True))
    with open(os.path.join(entry, "tokenizer_config.json")) as f:
        assert f.read().startswith("{\n")  # the damaged entry was replaced by the new conversion
    copy = tmp_path / "copy.gguf"
    os.symlink(smollm_gguf, copy)  # same file through another name: same entry
    assert entry_dir(str(tmp_path), str(copy)) == entry
    st = os.stat(smollm_gguf)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x" * 16)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert entry_dir(str(tmp_path), str(other)) != entry  # another file (size), another entry


def test_no_cache_root_writes_nothing(smollm_gguf, converted, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(gguf_tokenizer, "_save", lambda tok, entry: saved.append(entry))
    _same(converted, load_gguf_tokenizer(smollm_gguf, None, local_files_only=True))
    load_gguf_tokenizer(smollm_gguf, str(tmp_path), use_fast=False, local_files_only=True)  # slow: no cache
    assert saved == []


def test_config_parsed_once_then_read_from_the_cache(smollm_gguf, tmp_path, monkeypatch):
    parsed = gguf.gguf_config(smollm_gguf)  # no cache root: transformers parses the file
    assert gguf.gguf_config(smollm_gguf, str(tmp_path)) == parsed
    saved = os.path.join(gguf.cache_entry(str(tmp_path), smollm_gguf), "config.json")
    assert os.path.isfile(saved)

    def no_parse(path):
        raise AssertionError("parsed again")

    monkeypatch.setattr(gguf, "_parse_config", no_parse)
    assert gguf.gguf_config(smollm_gguf, str(tmp_path)) == parsed
    with open(saved, "w") as f:
        f.write("{damaged")
    monkeypatch.undo()
    assert gguf.gguf_config(smollm_gguf, str(tmp_path)) == parsed  # parsed again and rewritten
    with open(saved) as f:
        assert f.read().startswith("{") and gguf.gguf_config(smollm_gguf, str(tmp_path)) == parsed
