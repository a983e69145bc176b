"""Token acceptance: the one place that turns sampled tokens into outputs.

For each token read back it appends the token, fills logprob dicts, detokenizes, applies EOS, stop
token ids, stop strings (never matched in the text of the first ``min_tokens`` tokens, as vLLM
defines it), ``min_tokens``, ``max_tokens`` and the context limit (prompt + output may reach
``max_model_len``), and sets finish and stop reasons. It writes the output side of a ``Sequence``;
the scheduler writes the rest.

With ``track_deltas`` it also records what changed per sequence since ``step_deltas()`` was last read,
so ``step_deltas()`` can hand out ``RequestOutput`` deltas (``RequestOutput.add(delta, aggregate=True)``
rebuilds the whole output), after every step or only every few; a request's final output collects its
samples through ``RequestOutput.add`` as they finish.
"""

import time

from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.logprobs import LogprobsBuilder
from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kiln.runtime.sampling_params import RequestOutputKind, SamplingParams
from kiln.runtime.sequence import Sequence
from kiln.runtime.step_data import RunnerOutput

FINAL_ONLY = RequestOutputKind.FINAL_ONLY


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        seqs: list[Sequence],
        lora_request=None,
    ):
        self.request_id, self.prompt, self.prompt_token_ids, self.seqs = (
            request_id,
            prompt,
            prompt_token_ids,
            seqs,
        )
        self.arrival_time = time.time()
        self.finished_time: float | None = None
        self.output = RequestOutput(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            prompt_logprobs=seqs[0].prompt_logprobs,
            outputs=[CompletionOutput(s.index, "", [], None, None, lora_request=lora_request) for s in seqs],
            finished=False,
            lora_request=lora_request,
        )

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


def find_stop_string(text: str, new_text_len: int, params: SamplingParams) -> tuple[int, str] | None:
    """(length to keep, stop string) for the first stop string the newest ``new_text_len`` characters
    completed (a match may start in earlier text), or None."""
    hits = []
    for stop in params.stop:
        idx = text.find(stop, max(0, len(text) - new_text_len - len(stop) + 1))
        if idx != -1:
            hits.append((idx, stop))
    if not hits:
        return None
    idx, stop = min(hits)
    return (idx + len(stop) if params.include_stop_str_in_output else idx), stop


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}  # seq id -> its detokenizer
        self.logprobs = LogprobsBuilder(tokenizer)  # Logprob dicts with repaired byte-fallback text
        # with track_deltas: the sequences changed since ``step_deltas`` last took them, each with its
        # (tokens, text, logprobs) counts before the first of those changes; off, nothing is recorded
        self.track_deltas = False
        self._touched: dict[Sequence, tuple[int, int, int]] = {}
        # a recorded change is urgent: a sample's first tokens or its end (``step_deltas(urgent=True)``)
        self.has_urgent_deltas = False
        self._text_sent: dict[int, int] = {}  # seq id -> characters of its text handed out in deltas
        self.stats = None  # kiln.runtime.metrics.MetricsCollector: told of every accepted token

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        for seq in request.seqs:
            if self.tokenizer is not None and seq.params.detokenize:
                self.detokenizers[seq.seq_id] = IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids, seq.params.skip_special_tokens
                )

    def abort_all(self) -> None:
        self.requests.clear()
        self.detokenizers.clear()
        self._touched.clear()
        self._text_sent.clear()
        self.has_urgent_deltas = False

    def abort_request(self, request_id: str) -> Request | None:
        """Forget one request; its unfinished samples get finish reason ``"abort"``. None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            self.detokenizers.pop(seq.seq_id, None)
            self._text_sent.pop(seq.seq_id, None)
            self._touched.pop(seq, None)
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                request.output.add(self._final_sample(request, seq, False), aggregate=False)
        request.output.finished = True
        return request

    def add_sequence(self, seq: Sequence) -> None:
        """A sequence joins its running request (a forked beam; it does not detokenize)."""
        self.requests[seq.request_id].seqs.append(seq)

    def drop_sequence(self, seq: Sequence) -> None:
        """Forget one unfinished sequence of a running request (a beam not chosen); a request left
        with none is forgotten too, without an output."""
        request = self.requests.get(seq.request_id)
        self.detokenizers.pop(seq.seq_id, None)
        self._text_sent.pop(seq.seq_id, None)
        self._touched.pop(seq, None)
        if request is not None:
            request.seqs.remove(seq)
            if not request.seqs:
                del self.requests[seq.request_id]

    # ------------------------------------------------------------------ one step

    def process(
        self, out: RunnerOutput, seqs: dict[int, Sequence]
    ) -> tuple[list[Sequence], list[RequestOutput]]:
        """Accept a read-back step's tokens; returns (sequences that finished, requests that finished)."""
        for seq_id, entries in out.prompt_logprobs.items():
            seq = seqs.get(seq_id)
            if seq is not None:
                for t, e in entries:
                    pos = len(seq.prompt_logprobs)  # the target's position in the prompt
                    preceding = seq.prompt_token_ids[max(0, pos - 3) : pos]
                    seq.prompt_logprobs.append(self.logprobs.make(t, e, preceding, seq.params.detokenize))
        now = time.time()
        finished_seqs, finished = [], []
        touched = self._touched if self.track_deltas else None
        accept, get, logprobs = self._accept, seqs.get, out.logprobs
        for row, (seq_id, token) in enumerate(zip(out.seq_ids, out.read_back())):  # every sampled row
            seq = get(seq_id)
            if seq is None:  # aborted
                continue
            seq.num_pending_tokens -= 1
            if seq.finish_reason is not None:  # it stopped one step earlier; this token is surplus
                continue
            if seq.beam:  # its search reads the distribution as arrays: no Logprob dicts
                seq.beam_candidates, entry = (logprobs, row), None
            else:
                entry = logprobs[row]
            if touched is not None and seq not in touched and seq.params.output_kind is not FINAL_ONLY:
                lp = len(seq.logprobs) if seq.logprobs is not None else 0
                num_tokens = len(seq.output_token_ids)
                touched[seq] = (num_tokens, len(seq.text), lp)
                if not num_tokens:
                    self.has_urgent_deltas = True
            accept(seq, token, entry, now)
            if self.stats is not None:
                self.stats.on_token(
                    self.requests[seq.request_id].arrival_time, seq, len(seq.output_token_ids) - 1, now
                )
            if seq.finish_reason is None:
                continue
            if touched is not None and seq in touched:
                self.has_urgent_deltas = True
            self.detokenizers.pop(seq.seq_id, None)
            finished_seqs.append(seq)
            request = self.requests[seq.request_id]
            done = request.finished
            if done:
                request.finished_time = now
                del self.requests[seq.request_id]
            request.output.add(self._final_sample(request, seq, done), aggregate=False)
            if done:
                finished.append(request.output)
        return finished_seqs, finished

    def _accept(self, seq: Sequence, token: int, entry, now: float) -> None:
        params, output = seq.params, seq.output_token_ids
        output.append(token)
        grammar = seq.grammar
        if grammar is not None:
            grammar.accept(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if entry is not None:
            pos = seq.num_known_tokens - 1  # the accepted token's position
            preceding = seq.token_slice(max(0, pos - 3), pos)
            seq.logprobs.append(self.logprobs.make(token, entry, preceding, params.detokenize))
            seq.cumulative_logprob += entry[2]
        num_out = len(output)
        stopped_by_token = False
        # a grammar that accepted its stop token ends the sequence, min_tokens or not
        if num_out >= params.min_tokens or (grammar is not None and grammar.terminated):
            if not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason, stopped_by_token = "stop", True
            elif token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason, stopped_by_token = "stop", token, True
        detok = self.detokenizers.get(seq.seq_id) if params.detokenize else None
        if detok is not None and not (stopped_by_token and not params.include_stop_str_in_output):
            new_text = detok.add(token)
            seq.text += new_text
            # stop strings are looked for only in text after the first min_tokens tokens' text
            if seq.finish_reason is None and params.stop and new_text and num_out > params.min_tokens:
                hit = find_stop_string(seq.text, len(new_text), params)
                if hit is not None:
                    keep, stop = hit
                    seq.text = seq.text[:keep]
                    seq.finish_reason, seq.stop_reason = "stop", stop
        if seq.finish_reason is None and (
            num_out >= seq.max_tokens or len(seq.prompt_token_ids) + num_out >= self.max_model_len
        ):
            seq.finish_reason = "length"

    # ------------------------------------------------------------------ outputs

    @staticmethod
    def _completion(
        seq: Sequence, tokens_from: int = 0, text_from: int = 0, logprobs_from: int = 0, text_to=None
    ):
        return CompletionOutput(
            index=seq.index,
            text=seq.text[text_from:text_to],
            token_ids=seq.output_token_ids[tokens_from:],
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=None if seq.logprobs is None else seq.logprobs[logprobs_from:],
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            lora_request=seq.lora_request,
        )

    def _final_sample(self, request: Request, seq: Sequence, done: bool) -> RequestOutput:
        """A finished sample as an update of its request's output; with ``done`` the request's too."""
        metrics = None
        if done:
            seqs = request.seqs
            first_scheduled = min(s.first_scheduled_time for s in seqs)
            metrics = RequestMetrics(
                arrival_time=request.arrival_time,
                first_scheduled_time=first_scheduled,
                first_token_time=min(s.first_token_time for s in seqs),
                last_token_time=request.finished_time,
                finished_time=request.finished_time,
                time_in_queue=first_scheduled - request.arrival_time,
                num_generation_tokens=sum(len(s.output_token_ids) for s in seqs),
            )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=None,
            outputs=[self._completion(seq)],
            finished=done,
            lora_request=seq.lora_request,
            metrics=metrics,
            num_cached_tokens=(request.seqs[0].num_cached_tokens or 0) if done else None,
        )

    def step_deltas(self, urgent: bool = False, request_id: str | None = None) -> list[RequestOutput]:
        """What the steps since the last call added, one ``RequestOutput`` per request that got tokens:
        new text, token ids and logprobs of each sample that changed (the prompt logprobs with the
        first). Requests whose ``output_kind`` is ``FINAL_ONLY`` have none (nothing is recorded for
        them). ``urgent``: only the samples whose first tokens or end came since (the rest stay
        recorded for a later call); ``request_id``: only that request's samples.

        Only with ``track_deltas`` set before the requests run (RuntimeError otherwise). Call it after
        every step or every few (a finished sample stays recorded until taken): the text of an
        unfinished sample holds back ``params.output_text_buffer_length`` characters (a stop string may
        still cut them), so the deltas joined give exactly the final text.
        """
        if not self.track_deltas:
            raise RuntimeError(
                "step_deltas: deltas are not recorded; call LLMEngine.enable_step_deltas() "
                "before adding requests"
            )
        touched = self._touched
        if request_id is not None or urgent:
            taken = {
                seq: counts
                for seq, counts in touched.items()
                if (request_id is None or seq.request_id == request_id)
                and (not urgent or not counts[0] or seq.finish_reason is not None)
            }
            for seq in taken:
                del touched[seq]
            if urgent:
                self.has_urgent_deltas = False
        else:
            taken, self._touched, self.has_urgent_deltas = touched, {}, False
        requests, text_sent = self.requests, self._text_sent
        deltas: dict[str, RequestOutput] = {}
        several: list[RequestOutput] = []  # deltas of more than one sample: sorted by index at the end
        for seq, (tokens, _, logprobs) in taken.items():  # runs for every stream and step
            seq_id, text = seq.seq_id, seq.text
            sent = text_sent.get(seq_id, 0)
            if not text and not sent:  # no text (yet, or not detokenized)
                piece = ""
            else:
                if seq.finish_reason is None:
                    shown = max(sent, len(text) - seq.params.output_text_buffer_length)
                    text_sent[seq_id] = shown
                else:
                    shown = len(text)
                    text_sent.pop(seq_id, None)
                piece = text[sent:shown]
            completion = CompletionOutput(
                seq.index,
                piece,
                seq.output_token_ids[tokens:],
                seq.cumulative_logprob,
                None if seq.logprobs is None else seq.logprobs[logprobs:],
                seq.finish_reason,
                seq.stop_reason,
                seq.lora_request,
            )
            request_id = seq.request_id
            delta = deltas.get(request_id)
            if delta is None:
                deltas[request_id] = RequestOutput(
                    request_id,
                    None,
                    None,
                    seq.prompt_logprobs if tokens == 0 else None,
                    [completion],
                    request_id not in requests,
                    None,
                    seq.lora_request,
                )
                continue
            if len(delta.outputs) == 1:
                several.append(delta)
            delta.outputs.append(completion)
            if tokens == 0:
                delta.prompt_logprobs = seq.prompt_logprobs
        for delta in several:
            delta.outputs.sort(key=_index)
        return list(deltas.values())


def _index(completion: CompletionOutput) -> int:
    return completion.index
