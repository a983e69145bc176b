"""``LLM.beam_search`` against HF ``generate(num_beams=...)`` (no EOS: both searches agree) and against a
brute-force reference of vLLM's semantics (EOS candidates completed at any rank, score over prompt and
output length) on a model whose EOS is a frequent token; beams share their prefixes' KV blocks."""

import math

import pytest
import torch
import transformers
from conftest import make_tiny_checkpoint

from kiln import LLM, BeamSearchOutput, BeamSearchParams, SamplingParams
from kiln.runtime.beam_search import beam_search_score

PROMPTS = ["The capital of France is", "Once upon a time there", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17"]


def make_llm(path, **kw):
    return LLM(
        path, enforce_eager=True, dtype="float32", max_model_len=128, kv_cache_memory_bytes=2**23, **kw
    )


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with make_llm(tiny_checkpoint("llama")) as llm:
        yield llm


def hf_beams(path, tokenizer, width, max_tokens, length_penalty=1.0):
    """HF ``generate(num_beams=width)`` without EOS on each of PROMPTS: its outputs, in order."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = transformers.GenerationConfig(
        num_beams=width,
        num_return_sequences=width,
        max_new_tokens=max_tokens,
        do_sample=False,
        length_penalty=length_penalty,
        early_stopping=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        return [
            hf.generate(tokenizer(p, return_tensors="pt").input_ids, generation_config=config)
            for p in PROMPTS
        ]


@pytest.mark.parametrize("width,length_penalty", [(4, 1.0), (3, 0.5)])
def test_matches_hf_beam_search_without_eos(llm, tiny_checkpoint, width, length_penalty):
    max_tokens = 6
    params = BeamSearchParams(
        beam_width=width, max_tokens=max_tokens, ignore_eos=True, length_penalty=length_penalty
    )
    outs = llm.beam_search(PROMPTS, params)
    assert len(outs) == len(PROMPTS) and all(isinstance(o, BeamSearchOutput) for o in outs)
    refs = hf_beams(tiny_checkpoint("llama"), llm.tokenizer, width, max_tokens, length_penalty)
    for out, ref in zip(outs, refs):
        want = ref.sequences.tolist()
        got = [seq.tokens for seq in out.sequences]
        assert got == want
        # HF's score is cum_logprob / output_length ** length_penalty
        hf_cum = (ref.sequences_scores * max_tokens**length_penalty).tolist()
        for seq, cum in zip(out.sequences, hf_cum):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
            assert seq.cum_logprob == pytest.approx(
                sum(d[t].logprob for d, t in zip(seq.logprobs, seq.tokens[-6:]))
            )
            assert seq.text == llm.tokenizer.decode(seq.tokens) and seq.finish_reason == "length"


def reference_vllm_beam_search(hf, prompt_ids, width, max_tokens, eos, length_penalty):
    """vLLM's algorithm, every candidate scored by a full forward of its tokens."""

    def key(beam):
        return beam_search_score(beam[0], beam[1], eos, length_penalty)

    beams, completed = [(list(prompt_ids), 0.0)], []
    for _ in range(max_tokens):
        if not beams:
            break
        new = []
        for tokens, cum in beams:
            with torch.no_grad():
                logits = hf(torch.tensor([tokens])).logits[0, -1]
            lp = torch.log_softmax(logits.double(), -1)
            top = lp.topk(2 * width)
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                (completed if token == eos else new).append((tokens + [token], cum + value))
        beams = sorted(new, key=key, reverse=True)[:width]
    return sorted(completed + beams, key=key, reverse=True)[:width]


def test_matches_vllm_semantics_with_a_frequent_eos(tmp_path, tokenizer_dir, llm):
    # the token the model most often ranks first after these prompts becomes EOS
    firsts = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=4, max_tokens=3, ignore_eos=True))
    counts: dict[int, int] = {}
    for out in firsts:
        for seq in out.sequences:
            for d in seq.logprobs:
                for t in d:
                    counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)
    path = make_tiny_checkpoint(str(tmp_path), "llama", tokenizer_dir, eos_token_id=eos)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with make_llm(path, skip_tokenizer_init=True) as eos_llm:
        prompts = [{"prompt_token_ids": llm.tokenizer(p).input_ids} for p in PROMPTS]
        saw_eos = False
        for width, lp in ((3, 1.0), (2, 2.0)):
            outs = eos_llm.beam_search(
                prompts, BeamSearchParams(beam_width=width, max_tokens=7, length_penalty=lp)
            )
            for prompt, out in zip(prompts, outs):
                want = reference_vllm_beam_search(hf, prompt["prompt_token_ids"], width, 7, eos, lp)
                assert [s.tokens for s in out.sequences] == [w[0] for w in want]
                for seq, (_, cum) in zip(out.sequences, want):
                    assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
                    assert seq.finish_reason == ("stop" if seq.tokens[-1] == eos else "length")
                    saw_eos |= seq.tokens[-1] == eos
                    assert seq.text is None  # no tokenizer
        assert saw_eos, "pick another EOS: no completed beam was returned"
        engine = eos_llm.llm_engine
        assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks


def spy_steps(engine):
    """Replace the worker's ``execute_model`` by one that records each step's scheduled
    (seq id, start, tokens computed) and block copies; returns the record."""
    steps = []
    inner = engine.worker.execute_model

    def spy(out):
        steps.append(([(s.seq_id, s.start, s.num_tokens) for s in out.scheduled], list(out.copy_blocks)))
        return inner(out)

    engine.worker.execute_model = spy
    return steps


def assert_nothing_left(engine):
    assert not engine.has_unfinished_requests() and not engine.scheduler.held
    assert not engine.seqs and not engine.processor.requests
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_each_search_step_computes_one_token_per_live_beam(llm):
    engine = llm.llm_engine
    llm.reset_prefix_cache()
    steps = spy_steps(engine)
    try:
        width, max_tokens = 4, 5
        outs = llm.beam_search(
            PROMPTS, BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True)
        )
    finally:
        del engine.worker.execute_model
    lens = [len(llm.tokenizer(p).input_ids) for p in PROMPTS]
    assert max(lens) > llm.config.block_size  # a prompt with full blocks to share
    (prefill, _), later = steps[0], steps[1:]
    assert sorted((start, n) for _, start, n in prefill) == sorted((0, n) for n in lens)  # prompts, once
    assert len(later) == max_tokens - 1  # one engine step per search step: every beam in one batch
    for k, (scheduled, _) in enumerate(later):
        # each live beam computes its one chosen token, at the next position; nothing is computed again
        assert sorted((start, n) for _, start, n in scheduled) == sorted(
            (length + k, 1) for length in lens for _ in range(width)
        )
    total = sum(n for scheduled, _ in steps for _, _, n in scheduled)
    assert total == sum(lens) + (max_tokens - 1) * width * len(PROMPTS)
    copies = [pair for _, step_copies in later for pair in step_copies]
    assert copies  # forks copied their parents' partial blocks on the device
    assert all(len(o.sequences) == width for o in outs)
    assert_nothing_left(engine)


def test_a_search_that_raises_leaves_nothing_behind(llm):
    engine = llm.llm_engine
    params = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True)
    want = llm.beam_search(PROMPTS, params)
    calls = 0
    inner = engine.worker.execute_model

    def failing(out):
        nonlocal calls
        calls += 1
        if calls == 3:  # beams forked and held by now
            raise RuntimeError("device lost")
        return inner(out)

    engine.worker.execute_model = failing
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            llm.beam_search(PROMPTS, params)
    finally:
        del engine.worker.execute_model
    assert calls == 3
    assert_nothing_left(engine)
    again = llm.beam_search(PROMPTS, params)
    assert [[s.tokens for s in o.sequences] for o in again] == [[s.tokens for s in o.sequences] for o in want]
    assert_nothing_left(engine)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_kv_pressure_a_capped_batch_and_the_context_limit_change_no_result(
    llm, tiny_checkpoint, prefix_caching
):
    """10 blocks cannot hold every beam (held beams give blocks back and are recomputed), a step
    runs at most 5 sequences, and the long prompt reaches max_model_len after 3 tokens: its beams
    stay candidates while the others go on."""
    width = 4
    lens = [len(llm.tokenizer(p).input_ids) for p in PROMPTS]
    short = llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True))
    long = llm.beam_search(PROMPTS[2:], BeamSearchParams(beam_width=width, max_tokens=3, ignore_eos=True))
    block_bytes = llm.llm_engine.worker.kv_bytes_per_block()
    with LLM(
        tiny_checkpoint("llama"),
        enforce_eager=True,
        dtype="float32",
        max_model_len=lens[2] + 3,
        kv_cache_memory_bytes=10 * block_bytes,
        max_num_seqs=5,
        enable_prefix_caching=prefix_caching,
    ) as small:
        outs = small.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True))
        engine = small.llm_engine
        assert engine.num_blocks == 10 and engine.scheduler.num_preemptions > 0
        assert_nothing_left(engine)
    for out, ref in zip(outs, short + long):
        assert [s.tokens for s in out.sequences] == [s.tokens for s in ref.sequences]
        for seq, want in zip(out.sequences, ref.sequences):
            assert seq.cum_logprob == pytest.approx(want.cum_logprob, abs=1e-4)
            assert seq.finish_reason == "length"
    assert all(len(s.tokens) == lens[2] + 3 for s in outs[2].sequences)


def test_bad_input(llm):
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        BeamSearchParams(beam_width=2, max_tokens=-1)
    with pytest.raises(ValueError, match="params must be a BeamSearchParams"):
        llm.beam_search(PROMPTS, {"beam_width": 2})
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.beam_search(["fine", ""], BeamSearchParams(beam_width=2, max_tokens=2))
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.num_blocks
    assert not math.isnan(beam_search_score([1, 2], -1.0, 2, 1.0))


@pytest.mark.gpu
def test_on_cuda_with_compiled_forward_and_graphs_matches_hf(tiny_checkpoint, llm):
    """On the device (Triton attention, compiled forward, CUDA graphs), block copies on the device:
    HF's beams, one token per live beam per step."""
    path = tiny_checkpoint("llama")
    width, max_tokens = 4, 6
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True)
    with LLM(path, dtype="float32", max_model_len=128, kv_cache_memory_bytes=2**24) as gpu_llm:
        engine = gpu_llm.llm_engine
        assert engine.config.device.type == "cuda"
        steps = spy_steps(engine)
        outs = gpu_llm.beam_search(PROMPTS, params)
        del engine.worker.execute_model
        assert_nothing_left(engine)
    later = steps[1:]
    assert len(later) == max_tokens - 1 and any(copies for _, copies in later)
    assert all(len(s) == width * len(PROMPTS) and all(n == 1 for _, _, n in s) for s, _ in later)
    for out, ref in zip(outs, hf_beams(path, llm.tokenizer, width, max_tokens)):
        assert [s.tokens for s in out.sequences] == ref.sequences.tolist()
        for seq, cum in zip(out.sequences, (ref.sequences_scores * max_tokens).tolist()):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-3)


def test_queued_requests_run_alongside_and_keep_their_outputs(llm):
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)  # done within the search
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    params = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)
    beams = llm.beam_search(PROMPTS, params)
    ids = llm.enqueue(PROMPTS, greedy)
    assert [[s.tokens for s in o.sequences] for o in llm.beam_search(PROMPTS, params)] == [
        [s.tokens for s in o.sequences] for o in beams
    ]
    outs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outs] == ids and [o.outputs[0].token_ids for o in outs] == want
    assert_nothing_left(llm.llm_engine)


def reference_choose(beams, width, eos, ignore_eos, length_penalty):
    """vLLM's selection, one candidate at a time: ``beams`` are (logprob dict, cum, token count)."""
    from kiln.runtime.beam_search import _score

    candidates, completed = [], []
    for b, (dist, cum, length) in enumerate(beams):
        for token, lp in dist.items():
            total = cum + lp.logprob
            if token == eos and not ignore_eos:
                completed.append((b, total, length + 1))
            else:
                candidates.append((_score(length + 1, token, total, eos, length_penalty), b, token, total))
    candidates.sort(key=lambda c: c[0], reverse=True)
    return [(b, t, c) for _, b, t, c in candidates[:width]], completed


@pytest.mark.parametrize("ignore_eos,length_penalty", [(False, 1.0), (True, 0.5), (False, 2.0)])
def test_vectorised_choice_matches_one_candidate_at_a_time(ignore_eos, length_penalty):
    """Groups of 1, 3 and 4 beams of different lengths, quantised logprobs (many ties), sampled tokens
    inside and outside the top tokens, a frequent EOS, and a group that no longer grows."""
    from types import SimpleNamespace

    from kiln.runtime.beam_search import _Group, _Tree, choose
    from kiln.runtime.logprobs import LogprobsBuilder
    from kiln.runtime.top_logprobs import top_logprobs

    width, vocab, eos = 4, 12, 5
    params = BeamSearchParams(width, 8, ignore_eos=ignore_eos, length_penalty=length_penalty)
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        sizes, lengths = [1, 3, 4], [7, 9, 12]
        rows = sum(sizes)
        logits = torch.randint(-3, 1, (rows, vocab), generator=gen).float()
        logits[:, eos] += 1.0  # EOS among the top tokens of most rows
        logprobs = logits.log_softmax(-1)
        tokens = torch.randint(0, vocab, (rows,), generator=gen)
        src = top_logprobs(logprobs, tokens, [2 * width] * rows)
        tree, groups, want, row = _Tree(), [], [], 0
        builder = LogprobsBuilder(None)
        for n, length in zip(sizes, lengths):
            beams, ref = [], []
            for _ in range(n):
                cum = -float(torch.rand((), generator=gen)) * 3
                beams.append((SimpleNamespace(beam_candidates=(src, row)), tree.add(-1, 1, (src, row)), cum))
                ref.append((builder.make(int(tokens[row]), src[row], (), False), cum, length))
                row += 1
            groups.append(_Group([1] * length, None, beams, length=length))
            want.append(reference_choose(ref, width, eos, ignore_eos, length_penalty))
        still = _Group([1, 2], None, [(None, 0, -1.0)], length=2)
        got = choose(groups + [still], params, eos, tree)
        assert got[-1] is None and not still.completed
        for g, chosen, (ref_chosen, ref_completed) in zip(groups, got, want):
            assert chosen == ref_chosen, trial
            parent_index = {node: b for b, (_, node, _) in enumerate(g.beams)}
            completed = [(parent_index[tree.parent[node]], cum, n) for node, cum, n in g.completed]
            assert completed == ref_completed
            assert all(tree.token[node] == eos for node, _, _ in g.completed)
        assert ignore_eos or any(g.completed for g in groups)


def test_the_search_leaves_the_collector_as_it_found_it(llm):
    import gc

    params = BeamSearchParams(beam_width=2, max_tokens=2, ignore_eos=True)
    assert gc.get_freeze_count() == 0
    llm.beam_search(PROMPTS[:1], params)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own frozen heap stays frozen (less what the search freed of it)
    try:
        llm.beam_search(PROMPTS[:1], params)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
