"""Incremental detokenization against the tokenizer's own decode of the output tokens."""

import pytest

from kiln.runtime.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def byte_ids(tok, data: bytes) -> list[int]:
    """One byte-level token per byte (GPT-2's byte-to-character table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    ids = [tok.convert_tokens_to_ids(table[b]) for b in data]
    assert tok.unk_token_id not in ids
    return ids


def stream(tok, prompt_ids, output_ids) -> str:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=True)
    return "".join(detok.add(t) for t in output_ids)


def test_streamed_text_is_the_decoded_output(tok):
    prompt = tok.encode("The weather today is")
    output = tok.encode(" sunny, with a light breeze — 25 °C.")
    assert stream(tok, prompt, output) == tok.decode(output)


def test_stray_prompt_bytes_stay_out_of_the_output(tok):
    """A prompt ending in bytes that start no character (continuation bytes): the output's text is
    its own tokens' text, not the prompt's replacement characters."""
    prompt = tok.encode("x") + byte_ids(tok, b"\x82\x83\x84\x85")
    assert tok.decode(prompt).endswith("\ufffd")
    output = tok.encode("positive")
    assert stream(tok, prompt, output) == "positive"


def test_a_character_split_between_prompt_and_output_is_joined(tok):
    """'€' is E2 82 AC: the prompt ends with its first two bytes, the output starts with the third."""
    euro = byte_ids(tok, "€".encode())
    prompt = tok.encode("price: ") + euro[:2]
    output = euro[2:] + tok.encode(" 5")
    assert stream(tok, prompt, output) == "€ 5"


def test_an_output_character_over_several_tokens_waits_for_its_last_byte(tok):
    detok = IncrementalDetokenizer(tok, tok.encode("a"), skip_special_tokens=True)
    pieces = [detok.add(t) for t in byte_ids(tok, "€".encode())]
    assert pieces == ["", "", "€"]
