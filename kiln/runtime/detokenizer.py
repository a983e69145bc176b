"""Incremental detokenization (stop strings are applied by ``kiln.runtime.output_processor``).

Text is produced token by token by decoding a short window of ids twice (with and without the newest
tokens) and keeping the difference, which handles byte-level pieces and leading-space rules; a piece
that ends in an incomplete UTF-8 character is held back until the next token completes it.
"""

_CONTEXT = 6  # prompt tokens used as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # a prompt ending inside a UTF-8 character: its last bytes (at most 3: a character spans at most
        # 4) join the first output character. Bytes that no cut within 3 tokens resolves are not the
        # start of a character but stray bytes of the prompt: they stay out of the output.
        end = self.read_offset
        for back in range(4):
            if end - back >= 0 and not self._decode(self.ids[: end - back]).endswith("\ufffd"):
                self.read_offset = end - back
                break

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""
