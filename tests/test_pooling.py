"""Pooling models against HF transformers on tiny random checkpoints: classification logits,
embeddings (LAST / MEAN / CLS, Matryoshka), cross-encoder and cosine scores, per-token rewards;
mixed-length batches, chunked prefill, prefix caching on and off; the errors of misuse."""

import pytest
import torch
import torch.nn.functional as F
from pooling_oracle import (
    hf_classifier_logits,
    hf_hidden_states,
    hf_rewards,
    make_base_model,
    make_classifier,
    make_qwen2_reward,
    pool,
)

from kiln import (
    LLM,
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolerConfig,
    PoolingParams,
    PoolingRequestOutput,
    SamplingParams,
    ScoringRequestOutput,
)

TEXTS = [
    "Hello, my name is",
    "The capital of France is a city that has been",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22",
    "Once",
    "The capital of France is a city that has many",  # shares a prefix with text 1
]
SMALL = dict(enforce_eager=True, dtype="float32", max_model_len=128, kv_cache_memory_bytes=2**24)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def ids(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer_dir):
    cache = {}

    def get(arch, num_labels=3):
        if (arch, num_labels) not in cache:
            out = str(tmp_path_factory.mktemp(f"cls-{arch}-{num_labels}"))
            cache[arch, num_labels] = make_classifier(out, arch, tokenizer_dir, num_labels)
        return cache[arch, num_labels]

    return get


def _cos(a, b) -> float:
    return F.cosine_similarity(torch.as_tensor(a).float(), b.float(), dim=0).item()


def _assert_idle(llm):
    engine = llm.llm_engine
    assert not engine.seqs and not engine.pooled.requests and not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_classification_logits_match_hf(arch, classifier, ids):
    path = classifier(arch)
    reference = hf_classifier_logits(path, ids)
    with LLM(path, **SMALL) as llm:
        assert llm.runner_type == "pooling" and llm.pooling_spec.convert == "classify"
        assert llm.pooling_spec.id2label == {0: "label_0", 1: "label_1", 2: "label_2"}
        raw = llm.classify(
            [{"prompt_token_ids": p} for p in ids], PoolingParams(use_activation=False), use_tqdm=False
        )
        probs = llm.classify(TEXTS, use_tqdm=False)  # text prompts, default softmax
        _assert_idle(llm)
    for out, prob, ref in zip(raw, probs, reference):
        assert isinstance(out, ClassificationRequestOutput) and out.outputs.num_classes == 3
        assert torch.allclose(torch.tensor(out.outputs.probs), ref, atol=1e-4, rtol=0)
        assert torch.allclose(torch.tensor(prob.outputs.probs), ref.softmax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["LAST", "MEAN", "CLS"])
def test_embeddings_of_a_causal_lm_match_hf(pooling, tiny_checkpoint, ids):
    path = tiny_checkpoint("qwen2")
    reference = [F.normalize(pool(h, pooling), dim=0) for h in hf_hidden_states(path, ids)]
    # a 6-token budget splits the longer prompts into chunks over several steps
    with LLM(
        path,
        runner="pooling",
        pooler_config=PoolerConfig(pooling_type=pooling),
        max_num_batched_tokens=6,
        **SMALL,
    ) as llm:
        outputs = llm.embed([{"prompt_token_ids": p} for p in ids], use_tqdm=False)
        _assert_idle(llm)
    for out, ref, p in zip(outputs, reference, ids):
        assert isinstance(out, EmbeddingRequestOutput) and out.prompt_token_ids == p
        assert out.outputs.hidden_size == 128
        assert _cos(out.outputs.embedding, ref) >= 0.99999
        assert abs(torch.tensor(out.outputs.embedding).norm().item() - 1) < 1e-5


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_serves_last_token_pooling(prefix_caching, tiny_checkpoint, ids):
    path = tiny_checkpoint("llama")
    reference = [F.normalize(h[-1], dim=0) for h in hf_hidden_states(path, ids)]
    with LLM(path, convert="embed", enable_prefix_caching=prefix_caching, block_size=4, **SMALL) as llm:
        first = llm.embed(ids, use_tqdm=False)
        again = llm.embed(ids, use_tqdm=False)
        raw = llm.embed(ids[:1], PoolingParams(normalize=False), use_tqdm=False)
        _assert_idle(llm)
    for a, b, ref in zip(first, again, reference):
        assert _cos(a.outputs.embedding, ref) >= 0.99999
        assert _cos(b.outputs.embedding, ref) >= 0.99999
    expected = [(len(p) - 1) // 4 * 4 if prefix_caching else 0 for p in ids]
    assert [o.num_cached_tokens for o in again] == expected
    assert torch.allclose(
        torch.tensor(raw[0].outputs.embedding), hf_hidden_states(path, ids[:1])[0][-1], atol=1e-4
    )


def test_mean_pooling_reads_no_prefix_cache(tiny_checkpoint, ids):
    path = tiny_checkpoint("llama")
    reference = [F.normalize(h.mean(0), dim=0) for h in hf_hidden_states(path, ids)]
    with LLM(path, runner="pooling", pooler_config={"pooling_type": "MEAN"}, block_size=4, **SMALL) as llm:
        llm.embed(ids, use_tqdm=False)
        outputs = llm.embed(ids, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [0] * len(ids)
    for out, ref in zip(outputs, reference):
        assert _cos(out.outputs.embedding, ref) >= 0.99999


def test_qwen3_embedding_style_checkpoint(tmp_path, tokenizer_dir, ids):
    """Decoder-only weights (no ``model.`` prefix, no lm_head): as ``Qwen3Model`` it is an embedding
    model by default; declared ``Qwen3ForCausalLM`` it needs runner="pooling"."""
    path = make_base_model(str(tmp_path / "q3"), "qwen3", tokenizer_dir)
    reference = [F.normalize(h[-1], dim=0) for h in hf_hidden_states(path, ids)]
    with LLM(path, **SMALL) as llm:
        assert llm.pooling_spec.convert == "embed"
        outputs = llm.embed(ids, use_tqdm=False)
    for out, ref in zip(outputs, reference):
        assert _cos(out.outputs.embedding, ref) >= 0.99999
    causal = make_base_model(
        str(tmp_path / "q3c"), "qwen3", tokenizer_dir, architectures=["Qwen3ForCausalLM"]
    )
    with LLM(causal, runner="pooling", **SMALL) as llm:
        outputs = llm.embed(ids, use_tqdm=False)
    for out, ref in zip(outputs, reference):
        assert _cos(out.outputs.embedding, ref) >= 0.99999


def test_matryoshka_dimensions(tmp_path, tokenizer_dir, tiny_checkpoint, ids):
    path = make_base_model(str(tmp_path / "m"), "llama", tokenizer_dir, matryoshka_dimensions=[16, 32, 64])
    hidden = hf_hidden_states(path, ids)
    with LLM(path, **SMALL) as llm:
        outputs = llm.embed(ids, PoolingParams(dimensions=32), use_tqdm=False)
        full = llm.embed(ids, use_tqdm=False)
        with pytest.raises(ValueError, match=r"LLM.embed\(\).*dimensions=48.*\[16, 32, 64\]"):
            llm.embed(ids, PoolingParams(dimensions=48), use_tqdm=False)
        _assert_idle(llm)
    for out, f, h in zip(outputs, full, hidden):
        assert out.outputs.hidden_size == 32 and f.outputs.hidden_size == 64
        assert _cos(out.outputs.embedding, F.normalize(h[-1][:32], dim=0)) >= 0.99999
    with LLM(tiny_checkpoint("llama"), convert="embed", **SMALL) as llm:
        with pytest.raises(ValueError, match="does not support Matryoshka"):
            llm.embed(ids, PoolingParams(dimensions=32), use_tqdm=False)
        _assert_idle(llm)
    with pytest.raises(ValueError, match="does not support Matryoshka"):
        LLM(tiny_checkpoint("llama"), convert="embed", pooler_config=PoolerConfig(dimensions=8), **SMALL)


def test_cross_encoder_score(classifier, tok):
    path = classifier("qwen3", num_labels=1)
    query, docs = TEXTS[1], TEXTS[2:]
    pairs = [tok(query, text_pair=d)["input_ids"] for d in docs]
    reference = [x.sigmoid() for x in hf_classifier_logits(path, pairs)]
    with LLM(path, block_size=4, **SMALL) as llm:
        assert llm.pooling_spec.supports_score
        one = llm.score(query, docs[0], use_tqdm=False)
        one_to_n = llm.score(query, docs, use_tqdm=False)
        n_to_n = llm.score([query] * len(docs), docs, use_tqdm=False)
        with pytest.raises(ValueError, match=r"LLM.score\(\): data_1 has 2 items and data_2 3"):
            llm.score([query, query], docs, use_tqdm=False)
        _assert_idle(llm)
    assert isinstance(one[0], ScoringRequestOutput)
    assert abs(one[0].outputs.score - reference[0].item()) < 1e-5
    for outputs in (one_to_n, n_to_n):
        assert [o.prompt_token_ids for o in outputs] == pairs
        for out, ref in zip(outputs, reference):
            assert abs(out.outputs.score - ref.item()) < 1e-5
    # the shared query is served from the prefix cache once its blocks exist
    assert all(o.num_cached_tokens >= 4 for o in n_to_n)


def test_embedding_score_is_cosine_similarity(tiny_checkpoint, ids):
    path = tiny_checkpoint("mistral")
    hidden = {tuple(p): h[-1] for p, h in zip(ids, hf_hidden_states(path, ids))}
    with LLM(path, runner="pooling", **SMALL) as llm:
        one = llm.score(ids[0], ids[1], use_tqdm=False)
        one_to_n = llm.score(ids[0], ids[1:], use_tqdm=False)
        n_to_n = llm.score(ids[:3], ids[2:5], use_tqdm=False)
        _assert_idle(llm)

    def ref(a, b):
        return F.cosine_similarity(hidden[tuple(a)], hidden[tuple(b)], dim=0).item()

    assert abs(one[0].outputs.score - ref(ids[0], ids[1])) < 1e-5
    assert one[0].prompt_token_ids == ids[0] + ids[1]
    for out, b in zip(one_to_n, ids[1:]):
        assert abs(out.outputs.score - ref(ids[0], b)) < 1e-5
    for out, a, b in zip(n_to_n, ids[:3], ids[2:5]):
        assert abs(out.outputs.score - ref(a, b)) < 1e-5


def test_qwen2_reward_model(tmp_path, tokenizer_dir, ids):
    path = make_qwen2_reward(str(tmp_path / "rm"), tokenizer_dir)
    reference = hf_rewards(path, ids)
    with LLM(path, max_num_batched_tokens=7, **SMALL) as llm:
        assert llm.pooling_spec.convert == "reward" and llm.pooling_spec.head == "reward_mlp"
        outputs = llm.reward(ids, use_tqdm=False)
        encoded = llm.encode(ids[:2], pooling_task="token_classify", use_tqdm=False)
        _assert_idle(llm)
    for out, ref in zip(outputs, reference):
        assert isinstance(out, PoolingRequestOutput)
        assert out.outputs.data.shape == ref.shape
        assert torch.allclose(out.outputs.data, ref, atol=1e-4, rtol=0)
    assert torch.equal(encoded[0].outputs.data, outputs[0].outputs.data)


def test_token_embed_and_convert_reward(tiny_checkpoint, ids):
    path = tiny_checkpoint("llama")
    hidden = hf_hidden_states(path, ids)
    with LLM(path, convert="embed", **SMALL) as llm:
        tokens = llm.encode(ids, pooling_task="token_embed", use_tqdm=False)
    with LLM(path, convert="reward", **SMALL) as llm:
        rewards = llm.reward(ids, use_tqdm=False)
    for t, r, h in zip(tokens, rewards, hidden):
        assert torch.allclose(t.outputs.data, F.normalize(h, dim=-1), atol=1e-5)
        assert torch.allclose(r.outputs.data, h, atol=1e-4)


def test_misuse_raises_before_running(tiny_checkpoint, classifier, ids):
    gen_path = tiny_checkpoint("llama")
    with LLM(gen_path, runner="generate", **SMALL) as llm:
        for call in (lambda: llm.embed(ids), lambda: llm.classify(ids), lambda: llm.score(ids[0], ids[1])):
            with pytest.raises(ValueError, match=r"only supported for pooling models.*runner='generate'.*"):
                call()
        _assert_idle(llm)
        assert llm.generate(ids[:1], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    with LLM(classifier("llama"), **SMALL) as llm:
        with pytest.raises(
            ValueError, match=r"LLM.generate\(\) is only supported for generative.*runner='pooling'"
        ):
            llm.generate(ids[:1])
        with pytest.raises(ValueError, match=r"LLM.chat\(\)"):
            llm.chat([{"role": "user", "content": "hi"}])
        with pytest.raises(ValueError, match=r"LLM.embed\(\) needs the 'embed' task.*runner='pooling'"):
            llm.embed(ids)
        with pytest.raises(ValueError, match=r"LLM.score\(\).*num_labels=3"):
            llm.score(TEXTS[0], TEXTS[1])
        with pytest.raises(ValueError, match="more than max_model_len=128"):
            llm.classify([ids[0], list(range(200))])
        with pytest.raises(ValueError, match=r"LLM.classify\(\).*dimensions applies to embeddings only"):
            llm.classify(ids, PoolingParams(dimensions=16))
        with pytest.raises(ValueError, match="got 2 pooling_params for 3 prompts"):
            llm.classify(ids[:3], [PoolingParams()] * 2)
        _assert_idle(llm)
        assert len(llm.classify(ids[:2], use_tqdm=False)) == 2
    with pytest.raises(ValueError, match="runner='generate'.*no language-model head"):
        LLM(classifier("llama"), runner="generate", **SMALL)
    with pytest.raises(ValueError, match="convert='classify'.*no score head"):
        LLM(gen_path, convert="classify", **SMALL)
    with pytest.raises(ValueError, match="runner must be one of"):
        LLM(gen_path, runner="embed", **SMALL)
    with pytest.raises(ValueError, match="convert='none'.*pass convert='embed'"):
        LLM(gen_path, runner="pooling", convert="none", **SMALL)


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny_checkpoint, ids):
    path = tiny_checkpoint("llama")
    reference = F.normalize(hf_hidden_states(path, [ids[2][-5:]])[0][-1], dim=0)
    with LLM(path, convert="embed", **SMALL) as llm:
        out = llm.embed(ids[2], truncate_prompt_tokens=5, use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[2][-5:]
    assert _cos(out.outputs.embedding, reference) >= 0.99999


@pytest.mark.parametrize("kind", ["MEAN", "CLS", "ALL", "LAST"])
def test_recomputed_prompt_is_pooled_once(kind):
    """A preempted sequence is recomputed from position 0: its pooled rows restart there."""
    from types import SimpleNamespace

    from kiln.pooling.state import PooledRows

    hidden = torch.randn(10, 8)
    rows = PooledRows()
    prompt = list(range(10))

    def run_chunk(lo, n):
        s = SimpleNamespace(seq_id=7, start=lo, num_tokens=n, prompt_token_ids=prompt, pooling=kind)
        return rows.collect(hidden[lo : lo + n] + 0, [s], [0])

    assert run_chunk(0, 4) == {}
    assert run_chunk(4, 3) == {}  # preempted here, recomputed from scratch
    assert run_chunk(0, 6) == {}
    done = run_chunk(6, 4)
    expected = {"MEAN": hidden.mean(0), "CLS": hidden[0], "ALL": hidden, "LAST": hidden[-1]}[kind]
    assert torch.allclose(done[7], expected, atol=1e-6) and not rows.partial


def test_compiled_forward_serves_pooling(classifier, ids, tmp_path):
    """compilation_config=3 (piecewise Inductor): LAST pooling and per-token (ALL) outputs match HF."""
    from transformers import AutoModelForSequenceClassification

    path = classifier("llama")
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        per_token = [hf.score(hf.model(torch.tensor([p])).last_hidden_state[0]) for p in ids]
    engine = dict(SMALL, enforce_eager=False, max_num_batched_tokens=16)
    with LLM(path, compilation_config={"mode": 3, "cache_dir": str(tmp_path)}, **engine) as llm:
        assert llm.compile_report().mode == "piecewise"
        raw = llm.classify(ids, PoolingParams(use_activation=False), use_tqdm=False)
        tokens = llm.encode(ids, PoolingParams(use_activation=False), pooling_task="token_classify")
        assert llm.compile_report().recompilations == 0
    for r, t, ref in zip(raw, tokens, per_token):
        assert torch.allclose(torch.tensor(r.outputs.probs), ref[-1], atol=1e-4, rtol=0)
        assert torch.allclose(t.outputs.data, ref, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_piecewise_cuda_graphs_serve_pooling(tiny_checkpoint, classifier, ids):
    """On CUDA the default compile and piecewise graphs run the pooling batches; results match eager."""
    prompts = [list(range(300 + 7 * i, 300 + 7 * i + 5 + 9 * i)) for i in range(6)] + ids
    kwargs = dict(dtype="float32", max_num_seqs=8, max_model_len=256, max_num_batched_tokens=64)
    cc = {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}
    for path, method, opts in (
        (tiny_checkpoint("qwen3"), "embed", dict(runner="pooling")),
        (tiny_checkpoint("llama"), "embed", dict(runner="pooling", pooler_config={"pooling_type": "MEAN"})),
        (classifier("qwen2"), "classify", {}),
    ):
        with LLM(path, enforce_eager=True, **opts, **kwargs) as eager:
            expected = getattr(eager, method)(prompts, use_tqdm=False)
        with LLM(path, compilation_config=cc, **opts, **kwargs) as graphed:
            got = getattr(graphed, method)(prompts, use_tqdm=False)
            assert graphed.llm_engine.worker.graphs.replays("piecewise") > 0
            _assert_idle(graphed)
        for e, g in zip(expected, got):
            a = torch.tensor(getattr(e.outputs, "embedding", None) or e.outputs.probs)
            b = torch.tensor(getattr(g.outputs, "embedding", None) or g.outputs.probs)
            assert torch.allclose(a, b, atol=1e-4), (path, method)


def test_pooling_requests_are_counted_in_metrics(tiny_checkpoint, ids):
    path = tiny_checkpoint("llama")
    with LLM(path, convert="embed", disable_log_stats=False, **SMALL) as llm:
        llm.embed(ids, use_tqdm=False)
        metrics = {(m.name, tuple(sorted(m.labels.items()))): m for m in llm.get_metrics()}
    prompt_tokens = next(m for (name, _), m in metrics.items() if name == "vllm:prompt_tokens")
    assert prompt_tokens.value == sum(len(p) for p in ids)
    stops = [
        m
        for (name, labels), m in metrics.items()
        if name == "vllm:request_success" and ("finished_reason", "stop") in labels
    ]
    assert stops[0].value == len(ids)
