"""The engine's step loop against a fake worker (no model): the plain-data contract, stops, overlap and
preemption.

The fake worker keeps its own copy of every sequence's tokens (what a real one has in its KV cache
and its sampled-token buffers) and checks each ``SchedulerOutput`` against it: the tokens to compute,
where they start, which one is still pending on the device, the block table, which rows sample. Its
"model" picks the next token from the sequence's tokens, so recomputing a preempted sequence gives
the same tokens.
"""

import types

import pytest
import torch

from kiln.runtime.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.step_data import RunnerOutput, SchedulerOutput

VOCAB = 40
EOS = 3


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens) * 7) % (VOCAB - 5) + 5  # never EOS (3) nor below 5


class FakeWorker:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.asleep: set[str] = set()
        self.sleep_level = 0
        self.tokens: dict[int, list[int]] = {}  # seq id -> prompt + every token sampled for it
        self.known: set[int] = set()  # seq ids announced as new
        self.finished: set[int] = set()
        self.unread: RunnerOutput | None = None  # the last launched step
        self.launched_over_unread = 0  # steps launched before the previous one was read back
        self.pending_inputs = 0  # input tokens taken from the previous step's device output
        self.host_token_violations = 0  # steps needing host tokens launched over an unread step
        self.steps: list[SchedulerOutput] = []

    def execute_model(self, out: SchedulerOutput) -> RunnerOutput:
        assert out, "an empty step was launched"
        self.steps.append(out)
        unread = self.unread is not None and not self.unread.is_read_back
        self.launched_over_unread += unread
        for new in out.new_sequences:
            assert new.seq_id not in self.known
            self.known.add(new.seq_id)
        self.finished.update(out.finished_seq_ids)
        seq_ids, sampled, logprobs = [], [], []
        for s in out.scheduled:
            assert s.seq_id in self.known and s.seq_id not in self.finished
            history = self.tokens.setdefault(s.seq_id, list(s.prompt_token_ids))
            assert s.num_tokens == len(s.token_ids) + s.last_token_pending >= 1
            inputs = list(s.token_ids)
            if s.last_token_pending:  # the token the previous launch sampled, still on the device
                assert unread and s.seq_id in self.unread.seq_ids
                inputs.append(self.unread.tokens[self.unread.seq_ids.index(s.seq_id)].item())
                self.pending_inputs += 1
            assert inputs == history[s.start : s.start + s.num_tokens]
            assert len(s.block_ids) * self.block_size >= s.start + s.num_tokens
            assert s.sample == (s.start + s.num_tokens == len(history))
            assert s.output_token_ids == history[len(s.prompt_token_ids) :][: len(s.output_token_ids)]
            needs_host = s.params.logprobs is not None
            self.host_token_violations += needs_host and unread
            if s.sample:
                token = next_token(history)
                history.append(token)
                seq_ids.append(s.seq_id)
                sampled.append(token)
                logprobs.append(([token], [-0.25], -0.25, 1) if needs_host else None)
        result = RunnerOutput(seq_ids, torch.tensor(sampled, dtype=torch.long), logprobs, {})
        assert result.token_ids is None or not seq_ids  # not read back yet
        self.unread = result
        return result


class CharTokenizer:
    """One letter per token id: id i decodes to chr(ord('a') + i % 26); EOS decodes to nothing."""

    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (i == EOS and skip_special_tokens) else chr(97 + i % 26) for i in ids)


def make_engine(num_blocks=64, block_size=4, overlap=True, tokenizer=None, **kwargs):
    cfg = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)
    cfg.update(kwargs)
    config = EngineConfig(
        model_path="",
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_model_len_explicit=True,
        block_size=block_size,
        async_scheduling=overlap,
        **cfg,
    )
    worker = FakeWorker(num_blocks, block_size)
    engine = LLMEngine(config, types.SimpleNamespace(eos_token_id=[EOS]), tokenizer, worker=worker)
    return engine, worker


def run(engine, prompts, params) -> list[RequestOutput]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), None, prompt, p)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
    return [results[str(i)] for i in range(len(prompts))]


def expected_tokens(prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 1, 30, 9, 6)]  # 17 and 30 tokens: chunked prefill


@pytest.mark.parametrize("overlap", [True, False])
def test_contract_and_outputs(overlap):
    engine, worker = make_engine(overlap=overlap)
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (5, 1, 12, 3, 8, 2)]
    outs = run(engine, PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs):
        c = out.outputs[0]
        assert c.token_ids == expected_tokens(prompt, p.max_tokens)
        assert (c.finish_reason, c.stop_reason) == ("length", None)
        assert out.finished and out.metrics.num_generation_tokens == p.max_tokens
    assert engine.kv.num_free_blocks == engine.num_blocks and not engine.seqs
    assert any(s.num_tokens > 1 and not s.sample for step in worker.steps for s in step.scheduled)  # chunks
    if overlap:
        assert worker.launched_over_unread > 0 and worker.pending_inputs > 0
    else:
        assert worker.launched_over_unread == 0 and worker.pending_inputs == 0
    # every sequence was announced once and reported finished once
    announced = [n.seq_id for step in worker.steps for n in step.new_sequences]
    assert sorted(announced) == sorted(set(announced)) and len(announced) == len(PROMPTS)


def test_context_limit_reaches_max_model_len_exactly():
    engine, _ = make_engine(max_model_len=32)
    outs = run(engine, [list(range(5, 36)), list(range(5, 25))], SamplingParams(ignore_eos=True))
    assert len(outs[0].outputs[0].token_ids) == 1  # a prompt of max_model_len - 1 gets one token
    assert len(outs[1].outputs[0].token_ids) == 12  # prompt + output == max_model_len
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


@pytest.mark.parametrize("overlap", [True, False])
def test_stop_token_ids_eos_and_min_tokens(overlap):
    prompt = list(range(5, 12))
    base = expected_tokens(prompt, 12)
    target = base[4]
    first = base.index(target)
    engine, worker = make_engine(overlap=overlap)
    out = run(engine, [prompt], SamplingParams(max_tokens=12, stop_token_ids=[target]))[0].outputs[0]
    assert out.token_ids == base[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", target)
    # min_tokens holds the stop token back (the fake model does not ban it: the processor ignores it)
    later = [i for i, t in enumerate(base) if t == target and i >= first + 2]
    out = run(engine, [prompt], SamplingParams(max_tokens=12, stop_token_ids=[target], min_tokens=first + 2))
    c = out[0].outputs[0]
    if later:
        assert c.token_ids == base[: later[0] + 1] and c.finish_reason == "stop"
    else:
        assert c.token_ids == base and c.finish_reason == "length"
    engine.eos_token_ids = {target}
    out = run(engine, [prompt], SamplingParams(max_tokens=12))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (base[: first + 1], "stop", None)
    out = run(engine, [prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == base
    assert engine.kv.num_free_blocks == engine.num_blocks
    if overlap:  # the stop was seen one step late: the surplus token was sampled, then dropped
        assert worker.launched_over_unread > 0


def _text(ids):
    return CharTokenizer().decode(ids)


@pytest.mark.parametrize("overlap", [True, False])
def test_stop_strings_respect_min_tokens(overlap):
    prompt = list(range(5, 10))
    base = expected_tokens(prompt, 30)
    text = _text(base)
    letter = text[2]  # a stop string the third token's text ends with
    engine, _ = make_engine(overlap=overlap, tokenizer=CharTokenizer())
    out = run(engine, [prompt], SamplingParams(max_tokens=30, stop=[letter]))[0].outputs[0]
    cut = text.index(letter)
    assert out.text == text[:cut] and out.token_ids == base[: cut + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", letter)
    # with min_tokens=5 the text of the first five tokens is never searched
    out = run(engine, [prompt], SamplingParams(max_tokens=30, stop=[letter], min_tokens=5))[0].outputs[0]
    later = text.find(letter, 5)
    assert later != -1, "pick another prompt: the letter never comes back"
    assert out.text == text[:later] and out.token_ids == base[: later + 1]
    out = run(
        engine,
        [prompt],
        SamplingParams(max_tokens=30, stop=[letter], min_tokens=5, include_stop_str_in_output=True),
    )[0].outputs[0]
    assert out.text == text[: later + 1]


def test_preemption_keeps_outputs_identical():
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    roomy, _ = make_engine(num_blocks=64)
    expected = [o.outputs[0].token_ids for o in run(roomy, PROMPTS, params)]
    for overlap in (True, False):
        tight, worker = make_engine(num_blocks=14, overlap=overlap)  # 56 tokens for up to 4 sequences
        got = [o.outputs[0].token_ids for o in run(tight, PROMPTS, params)]
        assert got == expected
        assert tight.scheduler.num_preemptions > 0
        assert tight.kv.num_free_blocks == tight.num_blocks
        recomputed = [
            s for step in worker.steps for s in step.scheduled if s.start == 0 and s.output_token_ids
        ]
        assert recomputed, "no preempted sequence was recomputed"


def test_requests_needing_host_tokens_never_run_over_an_unread_step():
    engine, worker = make_engine()
    params = [SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1 if i % 2 else None) for i in range(6)]
    outs = run(engine, PROMPTS, params)
    assert worker.host_token_violations == 0
    for p, out in zip(params, outs):
        c = out.outputs[0]
        assert len(c.token_ids) == 6
        if p.logprobs is not None:
            assert [list(d) for d in c.logprobs] == [[t] for t in c.token_ids]
            assert c.cumulative_logprob == pytest.approx(-0.25 * 6)
        else:
            assert c.logprobs is None
    # once only plain requests are left, steps overlap again
    run(engine, PROMPTS[:2], SamplingParams(max_tokens=6, ignore_eos=True))
    assert worker.launched_over_unread > 0


def assert_joined_deltas_are_the_finals(merged: dict, final: dict) -> None:
    """Deltas added up per request (``merged``) equal each request's final output."""
    assert set(merged) == set(final)
    for rid, out in final.items():
        assert merged[rid].finished
        got = sorted((c.index, c.token_ids, c.text, c.finish_reason) for c in merged[rid].outputs)
        want = sorted((c.index, c.token_ids, c.text, c.finish_reason) for c in out.outputs)
        assert got == want


@pytest.mark.parametrize("overlap", [True, False])
def test_step_deltas_add_up_to_the_final_outputs(overlap):
    engine, _ = make_engine(overlap=overlap, tokenizer=CharTokenizer())
    engine.enable_step_deltas()
    params = [SamplingParams(n=2 if i == 1 else 1, max_tokens=4 + i, ignore_eos=True) for i in range(4)]
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), None, prompt, p)
    merged: dict[str, RequestOutput] = {}
    final: dict[str, RequestOutput] = {}
    steps_with_deltas = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
        deltas = engine.step_deltas()
        steps_with_deltas += bool(deltas)
        for d in deltas:
            assert all(len(c.token_ids) >= 1 for c in d.outputs)
            if d.request_id in merged:
                merged[d.request_id].add(d, aggregate=True)
            else:
                merged[d.request_id] = d
    assert steps_with_deltas > 3
    assert_joined_deltas_are_the_finals(merged, final)
    assert [c.index for c in final["1"].outputs] == [0, 1]


def test_step_deltas_join_the_steps_since_the_last_call():
    """Read only every third step (``urgent`` in between), the deltas still add up to the final
    outputs: ``urgent`` takes just the samples whose first tokens or end came, and leaves the rest
    recorded; ``request_id`` takes one request's."""
    engine, _ = make_engine(tokenizer=CharTokenizer())
    engine.enable_step_deltas()
    params = [SamplingParams(n=2 if i == 1 else 1, max_tokens=5 + 2 * i, ignore_eos=True) for i in range(4)]
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(str(i), None, prompt, p)
    merged: dict[str, RequestOutput] = {}
    final: dict[str, RequestOutput] = {}
    step = urgent_reads = 0

    def take(deltas):
        for d in deltas:
            if d.request_id in merged:
                merged[d.request_id].add(d, aggregate=True)
            else:
                merged[d.request_id] = d

    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            final[out.request_id] = out
        if step % 3 == 0:
            take(engine.step_deltas())
            assert not engine.processor.has_urgent_deltas and not engine.processor._touched
        elif engine.processor.has_urgent_deltas:
            deltas = engine.step_deltas(urgent=True)
            urgent_reads += 1
            assert deltas and not engine.processor.has_urgent_deltas
            for d in deltas:  # a first output starts at token 0; any other ends its samples
                first = d.request_id not in merged
                assert first or all(c.finish_reason is not None for c in d.outputs)
            take(deltas)
            # what was not urgent stays recorded
            assert all(
                seq.finish_reason is None and counts[0] > 0
                for seq, counts in engine.processor._touched.items()
            )
    take(engine.step_deltas())
    assert urgent_reads >= 2  # the first tokens, and ends between the full reads
    assert_joined_deltas_are_the_finals(merged, final)

    engine.add_request("a", None, PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("b", None, PROMPTS[1], SamplingParams(max_tokens=4, ignore_eos=True))
    for _ in range(3):
        engine.step()
    only_a = engine.step_deltas(request_id="a")
    assert [d.request_id for d in only_a] == ["a"] and only_a[0].outputs[0].token_ids
    assert {seq.request_id for seq in engine.processor._touched} == {"b"}


def test_step_deltas_leave_out_final_only_requests():
    """A FINAL_ONLY request gets no deltas (nothing is recorded for it); its final output and the
    other requests' deltas are as without it."""
    from kiln.runtime.sampling_params import RequestOutputKind

    engine, _ = make_engine(tokenizer=CharTokenizer())
    engine.enable_step_deltas()
    final_only = SamplingParams(max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    engine.add_request("final", None, PROMPTS[0], final_only)
    engine.add_request("delta", None, PROMPTS[2], SamplingParams(max_tokens=5, ignore_eos=True))
    seen, final, tokens = set(), {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
        assert all(seq.request_id == "delta" for seq in engine.processor._touched)
        for d in engine.step_deltas():
            seen.add(d.request_id)
            tokens += d.outputs[0].token_ids
    assert seen == {"delta"}
    assert final["final"].outputs[0].token_ids == expected_tokens(PROMPTS[0], 5)
    assert tokens == final["delta"].outputs[0].token_ids == expected_tokens(PROMPTS[2], 5)


def test_step_deltas_are_recorded_only_when_enabled():
    engine, _ = make_engine(tokenizer=CharTokenizer())
    engine.add_request("0", None, PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert not engine.processor._touched
    with pytest.raises(
        RuntimeError, match=r"step_deltas: deltas are not recorded; call LLMEngine.enable_step_deltas\(\)"
    ):
        engine.step_deltas()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[0].outputs[0].token_ids == expected_tokens(PROMPTS[0], 3)


def test_abort_all_frees_everything_and_tells_the_worker():
    engine, worker = make_engine()
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), None, prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    started = {s.seq_id for step in worker.steps for s in step.scheduled}
    engine.abort_all()
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks
    outs = run(engine, PROMPTS[:1], SamplingParams(max_tokens=2, ignore_eos=True))
    assert outs[0].outputs[0].token_ids == expected_tokens(PROMPTS[0], 2)
    assert started <= worker.finished  # the worker dropped the aborted sequences' state


@pytest.mark.parametrize("overlap", [True, False])
def test_abort_one_request_frees_its_blocks_and_leaves_the_others(overlap):
    engine, worker = make_engine(overlap=overlap)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(
            str(i), None, prompt, SamplingParams(n=2 if i == 1 else 1, max_tokens=10, ignore_eos=True)
        )
    engine.step()
    engine.step()
    with pytest.raises(ValueError, match="request_id '1' is already running"):
        engine.add_request("1", None, PROMPTS[0], SamplingParams(max_tokens=2))
    aborted = engine.abort_request("1")
    assert aborted.finished and [c.finish_reason for c in aborted.outputs] == ["abort", "abort"]
    assert engine.abort_request("1") is None and engine.abort_request("nope") is None
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
    assert set(results) == {"0", "2"}
    for i in (0, 2):
        assert results[str(i)].outputs[0].token_ids == expected_tokens(PROMPTS[i], 10)
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert not engine.processor.requests and not engine.processor.detokenizers


@pytest.mark.parametrize("overlap", [True, False])
def test_step_deltas_hold_back_text_a_stop_string_may_cut(overlap):
    tokenizer = CharTokenizer()
    prompt = PROMPTS[1]
    text = tokenizer.decode(expected_tokens(prompt, 30))
    stop = text[6:9]  # three letters spread over three tokens
    for include in (False, True):
        engine, _ = make_engine(overlap=overlap, tokenizer=tokenizer)
        engine.enable_step_deltas()
        params = SamplingParams(max_tokens=30, stop=[stop], include_stop_str_in_output=include)
        engine.add_request("0", None, prompt, params)
        want = text[: text.find(stop) + (len(stop) if include else 0)]
        joined, final = "", None
        while engine.has_unfinished_requests():
            done = engine.step()
            final = done[0] if done else final
            for d in engine.step_deltas():
                joined += d.outputs[0].text
                assert want.startswith(joined)  # nothing shown is cut later
        assert final.outputs[0].text == want and joined == want
