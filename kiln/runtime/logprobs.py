"""vLLM's logprob dicts: ``{token_id: Logprob(logprob, rank, decoded_token)}`` for one position.

``decoded_token`` is the token's text (``None`` with ``detokenize=False`` or without a tokenizer). A
byte-fallback token that ends inside a multi-byte UTF-8 character decodes to the replacement character on
its own; as in vLLM it is repaired from the preceding tokens: the token that completes a character gets
the whole character, one that cannot be completed gets ``""``.
"""

from collections.abc import Sequence

from kiln.runtime.outputs import Logprob

_REPLACEMENT = "\ufffd"
_MAX_PRECEDING = 3  # a UTF-8 character spans at most 4 bytes


class LogprobsBuilder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}  # memo: logprobs=-1 asks for every vocabulary entry at every step

    def decoded(self, token_id: int, preceding: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        if not text.endswith(_REPLACEMENT):
            return text
        preceding = list(preceding[-_MAX_PRECEDING:])
        for k in range(1, len(preceding) + 1):
            joined = self.tokenizer.decode(preceding[-k:] + [token_id])
            if not joined.endswith(_REPLACEMENT):
                return joined
        return ""

    def make(self, token_id: int, entry, preceding: Sequence[int], detokenize: bool) -> dict[int, Logprob]:
        """``entry`` is the sampler's (top ids, top values, value of ``token_id``, rank of ``token_id``)."""
        top_ids, top_values, value, rank = entry
        text = self.decoded if detokenize else lambda _t, _p: None
        result = {token_id: Logprob(value, rank, text(token_id, preceding))}
        for r, (t, v) in enumerate(zip(top_ids, top_values), start=1):
            if t not in result:
                result[t] = Logprob(v, r, text(t, preceding))
        return result
