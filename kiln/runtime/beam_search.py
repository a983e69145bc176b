"""``LLM.beam_search``: vLLM's beam search (``BeamSearchParams``, ``BeamSearchSequence``,
``BeamSearchOutput``) on kiln's engine.

Each step every live beam of every prompt is one request of one token with ``2 * beam_width``
logprobs, all added before the engine steps, so they run as one continuous batch. A beam's prompt is
its parent's tokens plus one: its full KV blocks come from the prefix cache (the parent's blocks,
shared by reference count, published when the parent's request finishes), so only the tokens past
the last full block (at most ``block_size``) are computed again.

Semantics are vLLM's, which differ from HF ``generate(num_beams=...)``:

- candidates: each beam's top ``2 * beam_width`` tokens; a candidate ending in EOS (unless
  ``ignore_eos``) is moved to the completed list, whatever its rank; the best ``beam_width`` others
  go on. There is no early stopping: the search runs ``max_tokens`` steps or until no beam is left.
- the score is ``cum_logprob / len(tokens) ** length_penalty``, ``tokens`` being prompt and output
  (an EOS at the end not counted); HF divides by the output length only and keeps EOS hypotheses only
  from the top ``beam_width`` ranks.
- the result: the best ``beam_width`` of completed and live beams; ``tokens`` hold the prompt and the
  output, ``text`` the decoded ``tokens``.

Without EOS (``ignore_eos``, or none met) and with equal lengths both searches keep the same beams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.input_processor import ProcessedPrompt
from kiln.runtime.outputs import Logprob
from kiln.runtime.sampling_params import SamplingParams


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
    seq_len = len(tokens)
    if eos_token_id is not None and tokens[-1] == eos_token_id:
        seq_len -= 1
    return cum_logprob / (seq_len**length_penalty)


def run_beam_search(
    llm, prompts: list, params: BeamSearchParams, lora_request=None
) -> list[BeamSearchOutput]:
    """The search over every prompt at once (``LLM.beam_search``)."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    step_params = SamplingParams(
        logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature, detokenize=False
    )
    # validated and tokenized up front: a bad prompt fails the call before anything runs
    prepared = llm._prepare(prompts, step_params, {}, None, lora_request)
    tokenizer = llm.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = next(iter(sorted(llm.llm_engine.eos_token_ids)), None)
    max_len = llm.config.max_model_len
    instances = [[BeamSearchSequence(tokens=list(p.token_ids), logprobs=[])] for p, _, _, _ in prepared]
    loras = [lora for _, _, _, lora in prepared]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prepared]

    def key(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    for _ in range(params.max_tokens):
        live = [
            (i, beam) for i, beams in enumerate(instances) for beam in beams if len(beam.tokens) < max_len
        ]
        if not live:
            break
        batch = [(ProcessedPrompt(None, beam.tokens), step_params, 0, loras[i]) for i, beam in live]
        outputs = llm._run_engine(llm._add_requests(batch), use_tqdm=False)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in instances]
        for (i, beam), out in zip(live, outputs):
            logprobs = out.outputs[0].logprobs[0]
            for token, lp in logprobs.items():
                child = BeamSearchSequence(
                    tokens=beam.tokens + [token],
                    logprobs=beam.logprobs + [logprobs],
                    cum_logprob=beam.cum_logprob + lp.logprob,
                )
                if token == eos and not params.ignore_eos:
                    child.finish_reason = "stop"
                    completed[i].append(child)
                else:
                    candidates[i].append(child)
        instances = [sorted(c, key=key, reverse=True)[: params.beam_width] for c in candidates]
    results = []
    for i, beams in enumerate(instances):
        for beam in beams:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(completed[i] + beams, key=key, reverse=True)[: params.beam_width]
        for beam in best:
            if tokenizer is not None:
                beam.text = tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results
