"""Batched sampling on the device: penalties, min_tokens, logit_bias, allowed_token_ids, bad_words,
the grammar's token mask (structured outputs), temperature, min_p, top_k, top_p, per-request seeds,
and the log-probabilities a request asked for (raw or processed, as ``logprobs_mode`` says).

Random rows draw ``token = argmax(logits / T - log q)`` with ``q ~ Exp(1)``, which samples from
``softmax(logits / T)`` (``kiln.ops.sample_argmax``); a row with a seed draws its ``q`` from its own
generator, so its tokens do not depend on the batch.
"""

from dataclasses import dataclass, field

import torch

from kiln.ops.sample_argmax import sample_argmax
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.top_logprobs import TopLogprobs, top_logprobs
from kiln.runtime.transfer import to_device
from kiln.structured.token_mask import TokenMask

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler reads about one row: its parameters, its generator and its tokens so far
    (the worker passes ``ScheduledSequence``s, which carry the same fields)."""

    params: SamplingParams
    generator: torch.Generator | None = None
    num_output_tokens: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # int64 [rows] on the device; reading it is the step's one host sync
    # per row: (top token ids, their logprobs, sampled token logprob, sampled token rank) or None
    logprobs: TopLogprobs | list[None]

    @property
    def token_ids(self) -> list[int]:
        return self.tokens.tolist()


@dataclass
class _Scan:
    """The rows' settings read in one pass (the sampler's host work per step is a loop over rows):
    per-row temperature (1 for greedy rows) and filters, and which optional stages any row needs."""

    temps: list[float]
    inv_temps: list[float]  # 0 for greedy rows
    top_k: list[int]
    top_p: list[float]
    min_p: list[float]
    all_greedy: bool
    repetition: bool
    presence_frequency: bool
    constraints: bool
    logprobs: bool
    seeded: bool


def _scan(seqs: list[SamplingRow]) -> _Scan:
    temps, inv_temps, top_k, top_p, min_p = [], [], [], [], []
    greedy, rep, pres_freq, constraints, logprobs, seeded = True, False, False, False, False, False
    for s in seqs:
        p = s.params
        if p.is_greedy:
            temps.append(1.0)
            inv_temps.append(0.0)
        else:
            greedy = False
            temps.append(p.temperature)
            inv_temps.append(1.0 / p.temperature)
        top_k.append(p.top_k)
        top_p.append(p.top_p)
        min_p.append(p.min_p)
        if p.repetition_penalty != 1.0:
            rep = True
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            pres_freq = True
        if p.logprobs is not None:
            logprobs = True
        if s.generator is not None and not p.is_greedy:
            seeded = True
        if not constraints and (
            p.logit_bias or p.allowed_token_ids or p.bad_words_token_ids or _bans_stops(s)
        ):
            constraints = True
    return _Scan(temps, inv_temps, top_k, top_p, min_p, greedy, rep, pres_freq, constraints, logprobs, seeded)


def _per_row(values: list, off, device) -> torch.Tensor | None:
    """``values`` on the device, or None when every row has the filter off."""
    return None if values.count(off) == len(values) else to_device(values, device)


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return to_device([list(r) + [-1] * (width - len(r)) for r in rows], device, torch.long)


def _token_counts(rows: list[list[int]], vocab: int, device) -> torch.Tensor:
    ids = _padded(rows, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids % (vocab + 1), torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]  # padding (-1) landed in the extra last column


def apply_penalties(logits: torch.Tensor, seqs: list[SamplingRow], scan: _Scan) -> torch.Tensor:
    if not (scan.repetition or scan.presence_frequency):
        return logits
    vocab, device = logits.shape[1], logits.device
    params = [s.params for s in seqs]
    if scan.repetition:
        seen = _token_counts([s.prompt_token_ids + s.output_token_ids for s in seqs], vocab, device) > 0
        rep = to_device([p.repetition_penalty for p in params], device)[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    if scan.presence_frequency:
        counts = _token_counts([s.output_token_ids for s in seqs], vocab, device)
        freq = to_device([p.frequency_penalty for p in params], device)[:, None]
        pres = to_device([p.presence_penalty for p in params], device)[:, None]
        logits = logits - freq * counts - pres * (counts > 0)
    return logits


def _bans_stops(s: SamplingRow) -> bool:
    """min_tokens not reached: stop ids (all_stop_token_ids holds stop_token_ids too) are banned. A
    constrained row gets this from its grammar mask, which lets the grammar's end win."""
    p = s.params
    return s.num_output_tokens < p.min_tokens and bool(p.all_stop_token_ids) and p.structured_outputs is None


def banned_words(s: SamplingRow) -> list[int]:
    """bad_words: the last token of each word whose other tokens end the output so far (vLLM's rule).
    A request with words of several tokens reads its tokens on the host (scheduler.needs_host_tokens)."""
    out = s.output_token_ids
    banned = []
    for ids in s.params.bad_words_token_ids:
        prefix = ids[:-1]
        if len(prefix) <= len(out) and (not prefix or out[len(out) - len(prefix) :] == prefix):
            banned.append(ids[-1])
    return banned


def apply_constraints(logits: torch.Tensor, seqs: list[SamplingRow], scan: _Scan) -> torch.Tensor:
    """min_tokens (stop ids banned until reached), logit_bias, allowed_token_ids, bad_words. Works on an
    fp32 copy."""
    if not scan.constraints:
        return logits
    logits = logits.to(torch.float32, copy=True)
    for i, s in enumerate(seqs):
        p = s.params
        if _bans_stops(s):
            logits[i].index_fill_(0, to_device(list(p.all_stop_token_ids), logits.device), _NEG_INF)
        banned = banned_words(s) if p.bad_words_token_ids else None
        if banned:
            logits[i].index_fill_(0, to_device(banned, logits.device), _NEG_INF)
        if p.logit_bias:
            ids = to_device(list(p.logit_bias), logits.device)
            logits[i].index_add_(0, ids, to_device(list(p.logit_bias.values()), logits.device, logits.dtype))
        if p.allowed_token_ids:
            keep = torch.full_like(logits[i], _NEG_INF)
            keep.index_fill_(0, to_device(p.allowed_token_ids, logits.device), 0.0)
            logits[i] += keep
    return logits


def top_k_top_p_min_p(logits: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """Mask logits outside each row's top-k / nucleus / min-p set.

    Each argument is a per-row tensor or None; k=0, p=1 and min_p=0 switch a row's filter off.
    """
    if min_p is not None:
        probs = logits.softmax(-1)
        thresh = probs.amax(-1, keepdim=True) * min_p[:, None]
        logits = logits.masked_fill(probs < thresh, _NEG_INF)
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[1])[:, None]
        mask |= ranks >= k
    if top_p is not None:
        probs = sorted_logits.masked_fill(mask, _NEG_INF).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        mask |= (before >= top_p[:, None]) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(mask, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    seqs: list[SamplingRow],
    generator: torch.Generator | None,
    logprobs_mode: str = "raw_logprobs",
    token_mask: TokenMask | None = None,
) -> SamplerOutput:
    """Pick one token per row of ``logits`` ``[len(seqs), vocab]`` (any float dtype); ``token_mask``
    holds the grammar's allowed tokens of the constrained rows.

    Requested logprobs come from ``logprobs_mode`` (vLLM's): the raw model output or the processed one
    (after penalties, logit_bias / allowed ids / min_tokens, temperature and the top-k / top-p / min-p
    masks), as log-probabilities or as logits."""
    device = logits.device
    scan = _scan(seqs)
    wants_logprobs = scan.logprobs
    reported = logits.float() if wants_logprobs and logprobs_mode.startswith("raw") else None
    logits = apply_constraints(apply_penalties(logits, seqs, scan), seqs, scan)
    filters = (None, None, None)
    if not scan.all_greedy:
        filters = (
            _per_row(scan.top_k, 0, device),
            _per_row(scan.top_p, 1.0, device),
            _per_row(scan.min_p, 0.0, device),
        )
    # the grammar's mask: inside the token choice when nothing else reads the masked logits
    fused_mask = None
    if token_mask is not None:
        if wants_logprobs or any(f is not None for f in filters):
            logits = token_mask.apply(logits)
        else:
            fused_mask = token_mask
    temps = scan.temps
    if scan.all_greedy:
        processed = logits
        tokens = sample_argmax(logits, token_mask=fused_mask)
    else:
        inv_temps = to_device(scan.inv_temps, device)
        if any(f is not None for f in filters):
            logits = top_k_top_p_min_p(
                logits / to_device(temps, device)[:, None], *filters
            )  # keeps row maxima
            processed = logits
            inv_temps = (inv_temps > 0).float()  # temperature applied above; greedy rows stay 0
        else:
            processed = None  # temperature applied inside sample_argmax
        q = torch.empty(logits.shape, dtype=torch.float32, device=device).exponential_(generator=generator)
        if scan.seeded:
            for i, s in enumerate(seqs):
                if s.generator is not None and not s.params.is_greedy:
                    q[i].exponential_(generator=s.generator)
        tokens = sample_argmax(logits, inv_temps, q, fused_mask)
    if not wants_logprobs:
        return SamplerOutput(tokens, [None] * len(seqs))
    if reported is None:  # processed modes
        reported = (
            processed.float() if processed is not None else logits.float() / to_device(temps, device)[:, None]
        )
    if logprobs_mode.endswith("logprobs"):
        reported = reported.log_softmax(-1)
    return SamplerOutput(tokens, _gather_logprobs(reported, tokens, seqs))


def _gather_logprobs(raw_logprobs, tokens, seqs):
    if raw_logprobs is None:
        return [None] * len(seqs)
    return top_logprobs(raw_logprobs, tokens, [s.params.logprobs for s in seqs])
