"""``AsyncLLM``: streaming by output kind, one continuous batch for many coroutines, aborts (explicit,
break, cancel), errors reaching only their coroutine, the lifecycle API and a clean shutdown."""

import asyncio
import gc
import threading

import pytest
from conftest import tiny_engine_kwargs

from kiln import AsyncEngineArgs, AsyncLLM, AsyncLLMEngine, RequestOutputKind, SamplingParams
from kiln.runtime import engine_thread
from kiln.runtime.async_llm import EngineDeadError

KINDS = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = AsyncLLMEngine.from_engine_args(
        AsyncEngineArgs(**tiny_engine_kwargs(tiny_checkpoint("llama"), kv_cache_memory_bytes=2**22))
    )
    yield engine
    engine.shutdown()


def engine_threads() -> set:
    return {t for t in threading.enumerate() if t.name == "kiln-engine"}


def run(coro):
    return asyncio.run(coro)


def hand_offs(monkeypatch, engine, joined: bool) -> None:
    """Pin the engine thread's hand-off schedule: after every step, or (``joined``) as seldom as it
    goes (first tokens and ends only); the test's end restores it."""
    if joined:
        monkeypatch.setattr(engine_thread, "HANDOFF_SHARE", 1e-12)
        monkeypatch.setattr(engine_thread, "MAX_HANDOFF_DELAY", 60.0)
    else:
        monkeypatch.setattr(engine_thread, "HANDOFF_SHARE", 1e9)
    monkeypatch.setattr(engine._engine, "_next_handoff", 0.0)  # the schedule of earlier tests


async def collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


async def idle(engine) -> bool:
    """Nothing in the engine and every KV block free (polls: an abandoned stream aborts shortly after)."""
    for _ in range(200):
        state = await engine._call(
            lambda llm: (llm.llm_engine.has_unfinished_requests(), llm.llm_engine.kv.num_free_blocks)
        )
        if not state[0] and state[1] == await engine._call(lambda llm: llm.llm_engine.num_blocks):
            return True
        await asyncio.sleep(0.01)
    return False


def merged(delta_outputs):
    """DELTA outputs joined into one output per sample index: (text, token ids, logprobs, ...)."""
    samples: dict[int, dict] = {}
    for out in delta_outputs:
        for c in out.outputs:
            s = samples.setdefault(c.index, {"text": "", "token_ids": [], "logprobs": []})
            s["text"] += c.text
            s["token_ids"] += c.token_ids
            s["logprobs"] += c.logprobs or []
            s["cumulative_logprob"], s["finish_reason"], s["stop_reason"] = (
                c.cumulative_logprob,
                c.finish_reason,
                c.stop_reason,
            )
    return samples


def as_dict(output):
    return {
        c.index: {
            "text": c.text,
            "token_ids": list(c.token_ids),
            "logprobs": list(c.logprobs or []),
            "cumulative_logprob": c.cumulative_logprob,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for c in output.outputs
    }


def assert_prompt_logprobs_close(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert list(g) == list(w)
        for token, entry in w.items():
            assert (g[token].rank, g[token].decoded_token) == (entry.rank, entry.decoded_token)
            assert abs(g[token].logprob - entry.logprob) <= tol, (token, g[token], entry)


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
        dict(temperature=1.0, seed=7, n=2, max_tokens=24, stop=["lygot", "Wal ord"], prompt_logprobs=1),
        dict(
            temperature=0.8, seed=3, max_tokens=30, stop=["unateoo", "zzzz"], include_stop_str_in_output=True
        ),
    ],
    ids=["greedy-logprobs", "seeded-n2-stops", "stop-included"],
)
def test_output_kinds_agree_with_each_other_and_generate(engine, params):
    async def main():
        want = await engine._call(
            lambda llm: llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0]
        )
        streams = {}
        for kind in KINDS:
            streams[kind] = await collect(
                engine, PROMPT, SamplingParams(**params, output_kind=kind), kind.name
            )
        return want, streams

    want, streams = run(main())
    cumulative, delta, final = (streams[k] for k in KINDS)
    assert len(final) == 1 and final[0].finished
    # the first tokens and the end are handed over at once; the steps between may be joined
    assert len(cumulative) > 1 and len(delta) > 1
    for outs in streams.values():
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert all(o.prompt == PROMPT and o.prompt_token_ids == want.prompt_token_ids for o in outs)
    expected = as_dict(want)
    if params.get("stop"):  # the stop strings span tokens and end every sample
        assert all(c.finish_reason == "stop" and c.stop_reason in params["stop"] for c in want.outputs)
    assert as_dict(final[0]) == expected
    assert as_dict(cumulative[-1]) == expected
    assert merged(delta) == expected
    # cumulative outputs only grow, and each is a prefix of the next
    for a, b in zip(cumulative, cumulative[1:]):
        for ca, cb in zip(a.outputs, b.outputs):
            assert cb.token_ids[: len(ca.token_ids)] == ca.token_ids and cb.text.startswith(ca.text)
    if params.get("prompt_logprobs"):
        # each stream is its own request whose prompt is prefilled in another batch: logprobs agree to
        # float rounding, tokens, ranks and decoded text exactly
        for got in (delta[0].prompt_logprobs, final[0].prompt_logprobs):
            assert_prompt_logprobs_close(got, want.prompt_logprobs)
    assert final[0].metrics is not None and delta[-1].metrics is not None
    assert run(idle(engine))


def test_many_coroutines_share_one_batch(engine):
    async def main():
        batch_sizes = []

        def spy(llm):
            inner = llm.llm_engine.step

            def step():
                batch_sizes.append(len(llm.llm_engine.scheduler.running))
                return inner()

            llm.llm_engine.step = step

        await engine._call(spy)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        try:
            outs = await asyncio.gather(
                *(collect(engine, f"prompt number {i}", params, f"b{i}") for i in range(8))
            )
        finally:
            await engine._call(lambda llm: vars(llm.llm_engine).pop("step"))
        want = await engine._call(
            lambda llm: llm.generate([f"prompt number {i}" for i in range(8)], params, use_tqdm=False)
        )
        return batch_sizes, outs, want

    batch_sizes, outs, want = run(main())
    assert max(batch_sizes) == 8
    assert [o[-1].outputs[0].token_ids for o in outs] == [w.outputs[0].token_ids for w in want]


def test_hand_offs_every_step_or_joined(engine, monkeypatch):
    """When handing over is cheap against a step, every step's tokens go at once (one output per
    token here); when it is not, the steps between hand-offs are joined, but the first token and the
    end never wait. Either way the outputs are what ``generate`` gives."""
    base = dict(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)

    async def streams():
        want = await engine._call(lambda llm: llm.generate(PROMPT, SamplingParams(**base), use_tqdm=False))
        got = {}
        for kind in KINDS:
            params = SamplingParams(**base, output_kind=kind)
            got[kind] = await collect(engine, PROMPT, params, f"handoff-{kind.name}")
        return want[0], got

    hand_offs(monkeypatch, engine, joined=False)
    want, every_step = run(streams())
    hand_offs(monkeypatch, engine, joined=True)
    _, joined = run(streams())
    counts = {
        (name, kind): [len(o.outputs[0].token_ids) for o in outs]
        for name, got in (("every", every_step), ("joined", joined))
        for kind, outs in got.items()
    }
    C, D, F = KINDS
    assert counts["every", D] == [1] * 20 and counts["every", C] == list(range(1, 21))
    assert counts["joined", D] == [1, 19] and counts["joined", C] == [1, 20]
    assert counts["every", F] == counts["joined", F] == [20]
    for got in (every_step, joined):
        assert merged(got[D]) == as_dict(got[C][-1]) == as_dict(got[F][0]) == as_dict(want)
        assert all(outs[-1].finished and not any(o.finished for o in outs[:-1]) for outs in got.values())
    assert run(idle(engine))


def test_an_abort_hands_over_the_tokens_not_handed_over_yet(engine, monkeypatch):
    """With hand-offs joined, ``abort`` first hands a DELTA stream the tokens since its last output:
    the joined outputs are the tokens the request got, a prefix of ``generate``'s."""
    hand_offs(monkeypatch, engine, joined=True)
    params = dict(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        want = await engine._call(lambda llm: llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False))
        outs = []
        delta = SamplingParams(**params, output_kind=RequestOutputKind.DELTA)
        async for out in engine.generate(PROMPT, delta, "abort-joined"):
            outs.append(out)
            if len(outs) == 1:
                for _ in range(100):  # until the engine has run a few more steps
                    await asyncio.sleep(0.01)
                    steps = await engine._call(
                        lambda llm: len(
                            llm.llm_engine.processor.requests["abort-joined"].seqs[0].output_token_ids
                        )
                    )
                    if steps >= 4:
                        break
                await engine.abort("abort-joined")
        return want[0], outs

    want, outs = run(main())
    tokens = merged(outs)[0]["token_ids"]
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs) == 3 and outs[-1].outputs[0].token_ids == []  # first token, the rest, the end
    assert 4 <= len(tokens) < 100 and tokens == want.outputs[0].token_ids[: len(tokens)]
    assert run(idle(engine))


def test_abort_ends_the_stream_and_frees_blocks(engine, monkeypatch):
    hand_offs(monkeypatch, engine, joined=False)  # three outputs come long before the end

    async def main():
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        outs = []
        async for out in engine.generate(PROMPT, params, "to-abort"):
            outs.append(out)
            if len(outs) == 3:
                await engine.abort("to-abort")
        return outs, await idle(engine)

    outs, was_idle = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 100 and was_idle


def test_break_and_cancel_abort_the_request(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        async for _ in engine.generate(PROMPT, params, "breaks"):
            break
        first = await idle(engine)

        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPT, params, "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        second = await idle(engine)
        # the ids are free again
        again = await collect(engine, PROMPT, SamplingParams(temperature=0, max_tokens=2), "breaks")
        return first, second, again

    first, second, again = run(main())
    assert first and second and again[-1].finished


def test_duplicate_ids_and_bad_requests_fail_only_their_coroutine(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        good = asyncio.create_task(collect(engine, PROMPT, params, "dup"))
        await asyncio.sleep(0.05)
        results = await asyncio.gather(
            collect(engine, PROMPT, params, "dup"),
            collect(engine, list(range(5, 300)), params, "too-long"),
            collect(engine, "", params, "empty"),
            collect(engine, PROMPT, SamplingParams(max_tokens=2, flat_logprobs=True), "unimplemented"),
            collect(engine, PROMPT, SamplingParams(temperature=0, max_tokens=3), "fine"),
            return_exceptions=True,
        )
        return await good, results, await idle(engine)

    good, results, was_idle = run(main())
    dup, too_long, empty, unimplemented, fine = results
    assert isinstance(dup, ValueError) and "'dup' is already in use" in str(dup)
    assert isinstance(too_long, ValueError) and "maximum model length" in str(too_long)
    assert isinstance(empty, ValueError) and "empty" in str(empty)
    assert isinstance(unimplemented, NotImplementedError)
    assert fine[-1].finished and len(fine[-1].outputs[0].token_ids) == 3
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 40
    assert was_idle and engine.is_running and not engine.errored


def test_pause_wait_and_abort_then_resume(engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        inflight = asyncio.create_task(collect(engine, PROMPT, params, "inflight"))
        await asyncio.sleep(0.05)
        await engine.pause_generation(wait_for_inflight_requests=True)
        # drained: the engine holds nothing, and the stream ends while still paused (its consumer task
        # may need a turn of the event loop to see the last output)
        drained = await engine._call(lambda llm: not llm.llm_engine.has_unfinished_requests())
        await asyncio.wait_for(asyncio.shield(inflight), 10)
        paused = await engine.is_paused()
        held = asyncio.create_task(collect(engine, PROMPT, params, "held"))
        await asyncio.sleep(0.1)
        held_waiting = not held.done() and await engine._call(
            lambda llm: not llm.llm_engine.has_unfinished_requests()
        )
        await engine.resume_generation()
        held_out = await held
        long = asyncio.create_task(
            collect(engine, PROMPT, SamplingParams(temperature=0, max_tokens=100), "cut")
        )
        await asyncio.sleep(0.05)
        await engine.pause_generation()  # aborts what is in flight
        cut = await long
        await engine.resume_generation()
        return drained, paused, held_waiting, await inflight, held_out, cut, await engine.is_paused()

    drained, paused, held_waiting, inflight, held, cut, paused_after = run(main())
    assert drained
    assert paused and held_waiting and not paused_after
    assert len(inflight[-1].outputs[0].token_ids) == 30 and len(held[-1].outputs[0].token_ids) == 30
    assert cut[-1].outputs[0].finish_reason == "abort"
    assert run(idle(engine))


def test_control_calls(engine):
    async def main():
        tokenizer = await engine.get_tokenizer()
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        before = (await collect(engine, PROMPT, params, "c1"))[-1].outputs[0].token_ids
        reset = await engine.reset_prefix_cache()
        await engine.sleep(1)
        asleep = await engine.is_sleeping()
        with pytest.raises(RuntimeError, match="asleep"):
            await collect(engine, PROMPT, params, "c2")
        await engine.wake_up()
        after = (await collect(engine, PROMPT, params, "c3"))[-1].outputs[0].token_ids
        await engine.check_health()
        return tokenizer, before, reset, asleep, after, await engine.is_sleeping()

    tokenizer, before, reset, asleep, after, still_asleep = run(main())
    assert tokenizer is not None and tokenizer.decode(before)
    assert reset and asleep and not still_asleep and after == before


def test_stream_interval_joins_outputs(tiny_checkpoint, monkeypatch):
    """``stream_interval=4``: the first output at once, then one per 4 tokens, then the final; the
    joined DELTA outputs and the CUMULATIVE ones are what ``generate`` gives."""
    monkeypatch.setattr(engine_thread, "HANDOFF_SHARE", 1e9)  # a hand-off after every step
    monkeypatch.setattr(engine_thread, "MAX_HANDOFF_DELAY", 0.0)
    with pytest.raises(ValueError, match="stream_interval must be a positive integer, got 0"):
        AsyncLLM(model=tiny_checkpoint("llama"), stream_interval=0)
    llm = AsyncLLM(**tiny_engine_kwargs(tiny_checkpoint("llama"), stream_interval=4))
    try:

        async def main():
            base = dict(temperature=0, max_tokens=11, ignore_eos=True)
            want = await llm._call(
                lambda inner: inner.generate(PROMPT, SamplingParams(**base), use_tqdm=False)
            )
            streams = {}
            for kind in KINDS:
                params = SamplingParams(**base, output_kind=kind)
                streams[kind] = await collect(llm, PROMPT, params, f"interval-{kind.name}")
            return want[0], streams

        want, streams = run(main())
    finally:
        llm.shutdown()
    cumulative, delta, final = (streams[k] for k in KINDS)
    assert [len(o.outputs[0].token_ids) for o in delta] == [1, 4, 4, 2]
    assert [len(o.outputs[0].token_ids) for o in cumulative] == [1, 5, 9, 11]
    assert merged(delta) == as_dict(want) == as_dict(cumulative[-1]) == as_dict(final[0])
    assert len(final) == 1 and all(outs[-1].finished for outs in streams.values())


def test_seed_001_streaming_example(tiny_checkpoint, capsys):
    """vLLM's streaming example, only the import lines and the model changed."""
    from kiln import AsyncEngineArgs, AsyncLLM, RequestOutputKind, SamplingParams  # noqa: F811

    model = tiny_checkpoint("llama")

    async def main():
        # Create AsyncLLM engine
        engine_args = AsyncEngineArgs(model=model, enforce_eager=True, dtype="float32", max_model_len=128)
        engine = AsyncLLM.from_engine_args(engine_args)

        try:
            # Configure sampling parameters for streaming
            sampling_params = SamplingParams(
                max_tokens=100, temperature=0.8, top_p=0.95, output_kind=RequestOutputKind.DELTA
            )

            # Stream response
            async for output in engine.generate(
                request_id="request-1",
                prompt="The future of artificial intelligence is",
                sampling_params=sampling_params,
            ):
                for completion in output.outputs:
                    if completion.text:
                        print(completion.text, end="", flush=True)

                if output.finished:
                    print("\nGeneration complete!")
                    break

        finally:
            engine.shutdown()

    before = engine_threads()
    asyncio.run(main())
    assert capsys.readouterr().out.endswith("\nGeneration complete!\n")
    assert engine_threads() == before  # the example's engine thread is gone


def test_shutdown_ends_streams_and_the_thread(tiny_checkpoint):
    llm = AsyncLLM(**tiny_engine_kwargs(tiny_checkpoint("llama")))
    thread = llm._engine._thread
    assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's reach while serving

    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in llm.generate(PROMPT, SamplingParams(max_tokens=100, ignore_eos=True), "r"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        llm.shutdown()
        with pytest.raises(EngineDeadError):
            await task
        with pytest.raises(EngineDeadError):
            await collect(llm, PROMPT, None, "after")
        with pytest.raises(EngineDeadError):
            await llm.reset_prefix_cache()

    run(main())
    assert not thread.is_alive() and not llm.is_running and llm.is_stopped and not llm.errored
    assert gc.get_freeze_count() == 0
    llm.shutdown()  # twice is fine


def test_constructor_errors_leave_no_thread(tiny_checkpoint):
    before = threading.active_count()
    with pytest.raises(ValueError, match="quantization"):
        AsyncLLM(model=tiny_checkpoint("llama"), quantization="awq")
    assert threading.active_count() == before


@pytest.mark.gpu
def test_gpu_compiled_engine_on_the_thread_streams_what_generate_gives(tiny_checkpoint):
    """On CUDA the engine thread compiles, captures CUDA graphs and serves: streams match generate."""
    engine = AsyncLLM(
        model=tiny_checkpoint("llama"), dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**26
    )
    try:

        async def main():
            params = SamplingParams(
                temperature=0, max_tokens=32, ignore_eos=True, output_kind=RequestOutputKind.DELTA
            )
            prompts = [f"{PROMPT} {i}" for i in range(16)]
            streams = await asyncio.gather(
                *(collect(engine, p, params, f"g{i}") for i, p in enumerate(prompts))
            )
            want = await engine._call(lambda llm: llm.generate(prompts, params, use_tqdm=False))
            report = await engine._call(lambda llm: llm.compile_report())
            return streams, want, report

        streams, want, report = run(main())
        for outs, w in zip(streams, want):
            assert merged(outs) == as_dict(w)
        assert report.mode != "none"
    finally:
        engine.shutdown()
