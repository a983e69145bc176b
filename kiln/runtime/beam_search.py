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

Host work per search step: the sampler's top logprobs of every beam come to the host in one copy
(``TopLogprobs``), the candidates of all prompts are scored and picked with numpy, and a beam is a
node of the search tree (parent, token, the distribution it was chosen from): tokens and ``Logprob``
dicts are built once, after the search, for the beams returned. The objects alive before the search
are left out of the garbage collector's full collections while it runs (``gc.freeze``): the step
loop's short-lived objects otherwise trigger full collections that walk the whole heap (model,
compiled code) every few dozen steps.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.runtime.logprobs import LogprobsBuilder
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


@dataclass
class _Group:
    """One prompt's search: its live beams as (engine sequence, or None once the engine finished it;
    tree node, -1 before the first token; cum logprob), the completed (EOS) ones as (node, cum
    logprob, token count), and the token count of its live beams (all equally long)."""

    prompt: list[int]
    lora: Any
    beams: list[tuple[Sequence | None, int, float]]
    completed: list[tuple[int, float, int]] = field(default_factory=list)
    length: int = 0

    @property
    def grows(self) -> bool:
        return bool(self.beams) and self.beams[0][0] is not None


# a chosen child: (parent index in its group, token, cum logprob)
Choice = tuple[int, int, float]


class _Tree:
    """The search tree of one call. Node ``i`` is one chosen output token: ``parent[i]`` (-1: the
    prompt), ``token[i]``, and the distribution it was chosen from (``source[i]``, a ``TopLogprobs``,
    and its ``row[i]``). Flat lists, no object per node: nothing more for the garbage collector."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.token: list[int] = []
        self.source: list = []
        self.row: list[int] = []

    def add(self, parent: int, token: int, candidates: tuple) -> int:
        """A child of ``parent`` by ``token``, chosen from ``candidates`` (``Sequence.beam_candidates``)."""
        source, row = candidates
        self.parent.append(parent)
        self.token.append(token)
        self.source.append(source)
        self.row.append(row)
        return len(self.token) - 1

    def path(self, node: int) -> list[int]:
        """The nodes from the first output token to ``node``."""
        nodes = []
        while node >= 0:
            nodes.append(node)
            node = self.parent[node]
        return nodes[::-1]


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
    with _heap_frozen():
        return _search(llm, engine, prepared, params, eos, tokenizer)


@contextlib.contextmanager
def _heap_frozen():
    """Objects alive now sit out garbage collections until the block ends (unless the caller froze
    the heap itself)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _search(
    llm, engine, prepared, params: BeamSearchParams, eos: int | None, tokenizer
) -> list[BeamSearchOutput]:
    """One beam per prompt, the search steps, then every prompt's result."""
    request_ids: set[str] = set()
    groups: list[_Group] = []
    tree = _Tree()
    try:
        for processed, p, _, lora in prepared:
            request_id = str(llm._request_counter)
            llm._request_counter += 1
            seq = engine.add_request(request_id, None, processed.token_ids, p, processed.cache_salt, 0, lora)[
                0
            ]
            seq.beam = True
            request_ids.add(request_id)
            prompt = list(processed.token_ids)
            groups.append(_Group(prompt, lora, [(seq, -1, 0.0)], length=len(prompt)))
        for _ in range(params.max_tokens):
            growing = [seq for g in groups if g.grows for seq, _, _ in g.beams]
            if not growing:
                break
            _step_until_sampled(llm, growing, request_ids)
            choices = choose(groups, params, eos, tree)
            for g, chosen in zip(groups, choices):  # blocks freed before any fork takes one
                _drop_unchosen(engine, g, chosen)
            for g, chosen in zip(groups, choices):
                _extend(engine, g, chosen, tree)
    except BaseException:
        engine.abort_all()  # an interrupted call leaves nothing behind for the next one
        llm._queue.clear()
        raise
    for request_id in request_ids:  # beams still held after the last step
        engine.abort_request(request_id)
    # the results are one graph of objects that all survive: nothing for the collector to find
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [_results(g, params, eos, tokenizer, tree) for g in groups]
    finally:
        if enabled:
            gc.enable()


def _step_until_sampled(llm, seqs: list[Sequence], request_ids: set[str]) -> None:
    """Run engine steps until every one of ``seqs`` has sampled its next token and it is read back
    (one step unless prompts are chunked, the batch is capped or blocks ran out). Requests of other
    calls (``enqueue``) run along; their outputs are kept for ``wait_for_completion``."""
    engine = llm.llm_engine
    while not all(s.status in (Status.HELD, Status.FINISHED) and not s.num_pending_tokens for s in seqs):
        for output in engine.step():
            if output.request_id not in request_ids:
                llm._queue.finished(output)


def candidates(seqs: list[Sequence], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates of each beam's last distribution, in the order of vLLM's logprob dict: its
    sampled token first, then its top ``k`` tokens but that one. Token ids and logprobs (fp64)
    ``[len(seqs), k + 1]``, and which entries are candidates (a top token equal to the sampled one is
    not)."""
    n = len(seqs)
    ids, logprobs = np.empty((n, k + 1), np.int64), np.empty((n, k + 1), np.float64)
    sources: dict[int, tuple] = {}  # the step outputs the beams sampled in (one, unless steps were capped)
    for i, seq in enumerate(seqs):
        src, row = seq.beam_candidates
        entry = sources.get(id(src))
        if entry is None:
            entry = sources[id(src)] = (src, [], [])
        entry[1].append(i)
        entry[2].append(src.index[row])
    for src, at, lines in sources.values():
        src.wait()
        at, lines = np.asarray(at), np.asarray(lines)
        ids[at, 0], logprobs[at, 0] = src.token_ids[lines], src.token_values[lines]
        ids[at, 1:], logprobs[at, 1:] = src.ids[lines, :k], src.values[lines, :k]
    valid = np.ones((n, k + 1), bool)
    valid[:, 1:] = ids[:, 1:] != ids[:, :1]
    return ids, logprobs, valid


def choose(
    groups: list[_Group], params: BeamSearchParams, eos: int | None, tree: _Tree
) -> list[list[Choice] | None]:
    """The next beams of every prompt, best first (None for a group that no longer grows: all of a
    prompt's beams are equally long, they reach ``max_model_len`` together); EOS candidates go to
    their group's completed list. All groups' candidates are scored and ranked at once; ties keep
    vLLM's order (parents best first, then the logprob dict's order)."""
    active = [g for g in groups if g.grows]
    result: dict[int, list[Choice]] = {}
    if active:
        seqs = [seq for g in active for seq, _, _ in g.beams]
        k, width = 2 * params.beam_width, params.beam_width
        ids, lps, valid = candidates(seqs, k)
        cums = np.array([cum for g in active for _, _, cum in g.beams])[:, None] + lps
        if eos is not None and not params.ignore_eos:
            ended = valid & (ids == eos)
            if ended.any():
                slot_group = [g for g in active for _ in g.beams]
                beam_nodes = [node for g in active for _, node, _ in g.beams]
                for slot, col in zip(*np.nonzero(ended)):  # slot order, then dict order: vLLM's
                    g, seq, node = slot_group[slot], seqs[slot], beam_nodes[slot]
                    child = tree.add(node, eos, seq.beam_candidates)
                    g.completed.append((child, float(cums[slot, col]), g.length + 1))
                valid &= ~ended
        # one row per group: its beams' candidates side by side, padded to the widest group
        most = max(len(g.beams) for g in active)
        shape = (len(active), most * (k + 1))
        scores, keep = np.zeros(shape), np.zeros(shape, bool)
        lo = 0
        for a, g in enumerate(active):
            n = len(g.beams)
            # a group's candidates are equally long (an EOS kept with ignore_eos counts one less)
            divisor = (g.length + 1) ** params.length_penalty
            group_scores = cums[lo : lo + n] / divisor
            if eos is not None and params.ignore_eos:
                at_eos = ids[lo : lo + n] == eos
                group_scores[at_eos] = cums[lo : lo + n][at_eos] / g.length**params.length_penalty
            scores[a, : n * (k + 1)] = group_scores.ravel()
            keep[a, : n * (k + 1)] = valid[lo : lo + n].ravel()
            lo += n
        order = np.lexsort((-scores, ~keep), axis=-1)[:, :width]  # stable: candidates, best first
        counts = np.minimum(keep.sum(-1), width).tolist()
        starts = np.cumsum([0] + [len(g.beams) for g in active[:-1]])  # each group's first slot
        at = starts[:, None] * (k + 1) + order  # positions in the flat candidate arrays
        parents = (order // (k + 1)).tolist()
        tokens, chosen_cums = ids.reshape(-1)[at].tolist(), cums.reshape(-1)[at].tolist()
        for a, g in enumerate(active):
            n = counts[a]
            result[id(g)] = list(zip(parents[a][:n], tokens[a][:n], chosen_cums[a][:n]))
    return [result.get(id(g)) for g in groups]


def _drop_unchosen(engine, g: _Group, chosen: list[Choice] | None) -> None:
    if chosen is None:
        return
    parents = {b for b, _, _ in chosen}
    for b, (seq, _, _) in enumerate(g.beams):
        if seq is not None and b not in parents and not seq.is_finished:
            engine.drop_sequence(seq)


def _extend(engine, g: _Group, chosen: list[Choice] | None, tree: _Tree) -> None:
    """The chosen children become the group's beams: a parent's first continues in place, the others
    fork it. Children of a sequence the engine finished (``max_tokens``, ``max_model_len``) grow no
    more. A group that no longer grows stays as it is."""
    if chosen is None:
        return
    extended, continued = [], set()
    for b, token, cum in chosen:
        seq, node, _ = g.beams[b]
        child = tree.add(node, token, seq.beam_candidates)
        if seq.is_finished:
            extended.append((None, child, cum))
        elif b in continued:
            extended.append((engine.fork_sequence(seq, token), child, cum))
        else:
            engine.continue_sequence(seq, token)
            continued.add(b)
            extended.append((seq, child, cum))
    g.beams = extended
    g.length += 1


def _results(
    g: _Group, params: BeamSearchParams, eos: int | None, tokenizer, tree: _Tree
) -> BeamSearchOutput:
    """The best ``beam_width`` of the group's completed and live beams, their tokens, logprob dicts
    and text built now (a dict shared by beams of one parent is one object, as in vLLM)."""
    last = g.prompt[-1]
    entries = [(node, cum, n, "stop") for node, cum, n in g.completed]
    entries += [(node, cum, g.length, "length") for _, node, cum in g.beams]

    def key(e) -> float:
        node, cum, n, _ = e
        return _score(n, tree.token[node] if node >= 0 else last, cum, eos, params.length_penalty)

    best = sorted(entries, key=key, reverse=True)[: params.beam_width]
    dicts: dict[tuple[int, int], dict[int, Logprob]] = {}
    builder = LogprobsBuilder(None)
    sequences = []
    for node, cum, _, finish in best:
        path = tree.path(node)
        logprobs = []
        for n in path:
            src, row = tree.source[n], tree.row[n]
            dist = dicts.get((id(src), row))
            if dist is None:
                src.wait()
                token_id = int(src.token_ids[src.index[row]])
                dist = dicts[id(src), row] = builder.make(token_id, src[row], (), False)
            logprobs.append(dist)
        tokens = [tree.token[n] for n in path]
        beam = BeamSearchSequence(
            tokens=g.prompt + tokens,
            logprobs=logprobs,
            lora_request=g.lora,
            cum_logprob=cum,
            finish_reason=finish,
        )
        if tokenizer is not None:
            beam.text = tokenizer.decode(beam.tokens)
        sequences.append(beam)
    return BeamSearchOutput(sequences=sequences)
