"""``LLM.beam_search``: vLLM's beam search (``BeamSearchParams``, ``BeamSearchSequence``,
``BeamSearchOutput``) on kiln's engine.

Every beam is one engine sequence for the whole search (``Sequence.beam``), and all beams of all
prompts run in one continuous batch. A search step: each live beam computes its one new token and
samples with ``2 * beam_width`` logprobs; the scheduler then holds it (keeps its KV blocks, schedules
it no more). Once every live beam has sampled, the search picks each prompt's next beams: a beam not
chosen is dropped (``LLMEngine.drop_sequence``: blocks freed), the first child of a beam continues in
place with its chosen token (``continue_sequence``), and every further child is a fork
(``fork_sequence``): it shares the parent's full blocks by reference count and gets a copy of the
parent's last, partial block, made on the device before the next forward
(``SchedulerOutput.copy_blocks``). The prompt is computed once; after it, no token is computed twice,
unless the KV cache runs out: then held beams give their blocks back and are recomputed (from the
prefix cache where it still holds their blocks), as preempted sequences are.

Semantics are vLLM's, which differ from HF ``generate(num_beams=...)``:

- candidates: each beam's top ``2 * beam_width`` tokens (and its sampled token, which with
  ``temperature > 0`` may lie outside them); a candidate ending in EOS (unless ``ignore_eos``) is moved
  to the completed list, whatever its rank; the best ``beam_width`` others go on. There is no early
  stopping: the search runs ``max_tokens`` steps or until no beam is left.
- the score is ``cum_logprob / len(tokens) ** length_penalty``, ``tokens`` being prompt and output
  (an EOS at the end not counted); HF divides by the output length only and keeps EOS hypotheses only
  from the top ``beam_width`` ranks.
- the result: the best ``beam_width`` of completed and live beams; ``tokens`` hold the prompt and the
  output, ``text`` the decoded ``tokens``.

Without EOS (``ignore_eos``, or none met) and with equal lengths both searches keep the same beams.
A prompt whose beams reach ``max_model_len`` stops growing; its beams stay candidates (``"length"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.outputs import Logprob
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Sequence, Status


@dataclass
class BeamSearchParams:
    """Beam search settings (vLLM's fields)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` (prompt and output), per output token the logprob dict it was chosen from,
    the summed logprob, and after the search its text and finish reason."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    lora_request: Any = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    multi_modal_data: Any = None
    mm_processor_kwargs: Any = None


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


def beam_search_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None, length_penalty: float):
    """vLLM's score: ``cum_logprob / seq_len ** length_penalty`` (a final EOS not counted)."""
    return _score(len(tokens), tokens[-1], cum_logprob, eos_token_id, length_penalty)


def _score(seq_len: int, last: int, cum_logprob: float, eos_token_id: int | None, length_penalty: float):
    if eos_token_id is not None and last == eos_token_id:
        seq_len -= 1
    return cum_logprob / (seq_len**length_penalty)


# a beam: its result so far and, while it grows, its engine sequence
Beam = tuple[BeamSearchSequence, Sequence | None]


def run_beam_search(
    llm, prompts: list, params: BeamSearchParams, lora_request=None
) -> list[BeamSearchOutput]:
    """The search over every prompt at once (``LLM.beam_search``)."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    # the engine never ends a beam on a token: EOS is the search's decision
    beam_params = SamplingParams(
        logprobs=2 * params.beam_width,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        detokenize=False,
        ignore_eos=True,
    )
    # validated and tokenized up front: a bad prompt fails the call before anything runs
    prepared = llm._prepare(prompts, beam_params, {}, None, lora_request)
    tokenizer = llm.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = next(iter(sorted(llm.llm_engine.eos_token_ids)), None)
    engine = llm.llm_engine
    request_ids: set[str] = set()
    beams: list[list[Beam]] = []
    completed: list[list[BeamSearchSequence]] = [[] for _ in prepared]
    try:
        for processed, p, _, lora in prepared:
            request_id = str(llm._request_counter)
            llm._request_counter += 1
            seq = engine.add_request(request_id, None, processed.token_ids, p, processed.cache_salt, 0, lora)[
                0
            ]
            seq.beam = True
            request_ids.add(request_id)
            beams.append([(BeamSearchSequence(list(processed.token_ids), [], lora_request=lora), seq)])
        for _ in range(params.max_tokens):
            growing = [seq for group in beams for _, seq in group if seq is not None]
            if not growing:
                break
            _step_until_sampled(llm, growing, request_ids)
            choices = [_choose(group, done, params, eos) for group, done in zip(beams, completed)]
            for group, chosen in zip(beams, choices):  # blocks freed before any fork takes one
                _drop_unchosen(engine, group, chosen)
            beams = [_extend(engine, group, chosen) for group, chosen in zip(beams, choices)]
    except BaseException:
        engine.abort_all()  # an interrupted call leaves nothing behind for the next one
        llm._queue.clear()
        raise
    for request_id in request_ids:  # beams still held after the last step
        engine.abort_request(request_id)

    def key(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    results = []
    for group, done in zip(beams, completed):
        for beam, _ in group:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(done + [beam for beam, _ in group], key=key, reverse=True)[: params.beam_width]
        for beam in best:
            if tokenizer is not None:
                beam.text = tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results


def _step_until_sampled(llm, seqs: list[Sequence], request_ids: set[str]) -> None:
    """Run engine steps until every one of ``seqs`` has sampled its next token and it is read back
    (one step unless prompts are chunked, the batch is capped or blocks ran out). Requests of other
    calls (``enqueue``) run along; their outputs are kept for ``wait_for_completion``."""
    engine = llm.llm_engine
    while not all(s.status in (Status.HELD, Status.FINISHED) and not s.num_pending_tokens for s in seqs):
        for output in engine.step():
            if output.request_id not in request_ids:
                llm._queue.finished(output)


def _choose(
    group: list[Beam], completed: list[BeamSearchSequence], params: BeamSearchParams, eos: int | None
) -> list[tuple[int, int, float]] | None:
    """The next beams of one prompt as (parent index in ``group``, token, cum logprob), best first; EOS
    candidates go to ``completed``. None if the group no longer grows (all of a prompt's beams are
    equally long: they reach ``max_model_len`` together)."""
    if not group or group[0][1] is None:
        return None
    candidates = []  # (score, parent, token, cum logprob), in vLLM's order: parents best first
    for b, (beam, seq) in enumerate(group):
        dist = seq.logprobs[-1]
        seq_len = len(beam.tokens) + 1
        for token, lp in dist.items():
            cum = beam.cum_logprob + lp.logprob
            if token == eos and not params.ignore_eos:
                completed.append(_child(beam, token, dist, cum, "stop"))
            else:
                candidates.append((_score(seq_len, token, cum, eos, params.length_penalty), b, token, cum))
    candidates.sort(key=lambda c: c[0], reverse=True)  # stable: ties keep vLLM's order
    return [(b, token, cum) for _, b, token, cum in candidates[: params.beam_width]]


def _child(beam: BeamSearchSequence, token: int, dist: dict, cum: float, finish: str | None = None):
    return BeamSearchSequence(
        tokens=beam.tokens + [token],
        logprobs=beam.logprobs + [dist],
        lora_request=beam.lora_request,
        cum_logprob=cum,
        finish_reason=finish,
    )


def _drop_unchosen(engine, group: list[Beam], chosen: list[tuple[int, int, float]] | None) -> None:
    if chosen is None:
        return
    parents = {b for b, _, _ in chosen}
    for b, (_, seq) in enumerate(group):
        if seq is not None and b not in parents and not seq.is_finished:
            engine.drop_sequence(seq)


def _extend(engine, group: list[Beam], chosen: list[tuple[int, int, float]] | None) -> list[Beam]:
    """The chosen children: a parent's first continues in place, the others fork it. Children of a
    sequence the engine finished (``max_tokens``, ``max_model_len``) grow no more. A group that no
    longer grows stays as it is."""
    if chosen is None:
        return group
    extended, continued = [], set()
    for b, token, cum in chosen:
        beam, seq = group[b]
        child = _child(beam, token, seq.logprobs[-1], cum)
        if seq.is_finished:
            extended.append((child, None))
        elif b in continued:
            extended.append((child, engine.fork_sequence(seq, token)))
        else:
            engine.continue_sequence(seq, token)
            continued.add(b)
            extended.append((child, seq))
    return extended
