"""Structured outputs end to end on a tiny random model: whatever the (noise) model prefers, every
output parses and validates; unconstrained neighbours are untouched; bad constraints are refused cleanly."""

import ast
import json
import re
from concurrent.futures import Future

import pytest

from kiln import LLM, SamplingParams, StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                },
                "required": ["name", "id"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 4},
                "minItems": 2,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "L"]},
        },
        "required": ["color", "size"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": -5, "maximum": 20},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["count", "ratio"],
    },
    "optional_keys": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "string", "maxLength": 3},
        },
        "required": ["a"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "v": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 99},
                    {"type": "string", "maxLength": 3},
                ]
            }
        },
        "required": ["v"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    },
}
PROMPTS = ["Hello", "Give me JSON:", "The weather today", "1 2 3 4"]
# greedy and seeded sampling, so the constraint is tested on different noise
DRAWS = [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1}, {"temperature": 0.8, "top_p": 0.9, "seed": 2}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(
        tiny_checkpoint("llama"), dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**25
    ) as llm:
        yield llm


def constrained(max_tokens=160, **so):
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(**so)
    )


def test_json_schema_suite_always_validates(llm):
    requests = []
    for name, schema in SCHEMAS.items():
        for i, draw in enumerate(DRAWS):
            # a noise model would fill free whitespace forever: JSON tokens back to back
            so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
            requests.append((name, PROMPTS[i], SamplingParams(max_tokens=160, structured_outputs=so, **draw)))
    outs = llm.generate([r[1] for r in requests], [r[2] for r in requests], use_tqdm=False)
    for (name, _, _), out in zip(requests, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        jsonschema.validate(json.loads(completion.text), SCHEMAS[name])
    assert llm.llm_engine.kv.num_free_blocks == llm.llm_engine.num_blocks


def test_json_string_schema_and_json_object(llm):
    outs = llm.generate(
        PROMPTS[:2],
        [
            constrained(json=json.dumps(SCHEMAS["enum"]), disable_any_whitespace=True),
            SamplingParams(
                temperature=1.0, seed=3, max_tokens=200, structured_outputs={"json_object": True}, stop=None
            ),
        ],
        use_tqdm=False,
    )
    jsonschema.validate(json.loads(outs[0].outputs[0].text), SCHEMAS["enum"])
    # any JSON object, nothing bounding it: complete when it ends by itself, a prefix of one when cut
    text = outs[1].outputs[0].text
    assert text.lstrip().startswith("{")
    if outs[1].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("pattern", [r"[a-c]{2,5}-\d{3}", r"(yes|no|maybe)!{0,2}", r"\d{1,3}(\.\d{1,2})?"])
def test_regex_outputs_fullmatch(llm, pattern):
    params = [
        SamplingParams(max_tokens=40, structured_outputs={"regex": pattern}, **draw) for draw in DRAWS
    ] + [SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=40, structured_outputs={"regex": pattern})]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    texts = [c.text for o in outs for c in o.outputs]
    assert len(texts) == 6
    for text in texts:
        assert re.fullmatch(pattern, text), (pattern, text)
    assert all(c.finish_reason == "stop" for o in outs for c in o.outputs)


def test_choice_outputs_are_choices(llm):
    choices = ["positive", "negative", "neutral", 'say "hi"\n']
    params = [SamplingParams(max_tokens=20, structured_outputs={"choice": choices}, **d) for d in DRAWS]
    params.append(SamplingParams(temperature=1.0, n=4, max_tokens=20, structured_outputs={"choice": choices}))
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for o in outs:
        for c in o.outputs:
            assert c.text in choices and c.finish_reason == "stop"


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "*") term){0,3}
term ::= [1-9] [0-9]{0,2} | "(" expr ")"
"""


def _arithmetic(node) -> bool:
    if isinstance(node, ast.Expression):
        return _arithmetic(node.body)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, (ast.Add, ast.Mult)) and _arithmetic(node.left) and _arithmetic(node.right)
    return isinstance(node, ast.Constant) and isinstance(node.value, int)


def test_ebnf_grammar_outputs_parse(llm):
    params = [SamplingParams(max_tokens=40, structured_outputs={"grammar": ARITHMETIC}, **d) for d in DRAWS]
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for o in outs:
        text, reason = o.outputs[0].text, o.outputs[0].finish_reason
        if reason == "stop":
            assert _arithmetic(ast.parse(text, mode="eval")), text
        else:  # nesting "(" can outgrow max_tokens: then the text is a prefix of the language
            assert reason == "length" and re.fullmatch(r"[0-9+*()]+", text), text
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 2


def test_unconstrained_rows_are_untouched(llm):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPTS[:2], plain, use_tqdm=False)
    mixed = llm.generate(
        [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]],
        [
            plain,
            constrained(json=SCHEMAS["nested"], disable_any_whitespace=True),
            plain,
            constrained(regex="[a-z]{1,8}"),
        ],
        use_tqdm=False,
    )
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS["nested"])


def test_seeded_sampling_under_a_constraint_is_reproducible(llm):
    so = StructuredOutputsParams(json=SCHEMAS["array"], disable_any_whitespace=True)
    params = SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=120, structured_outputs=so)
    first = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    noise = SamplingParams(temperature=1.0, max_tokens=30)
    again = llm.generate([PROMPTS[0], PROMPTS[1]], [noise, params], use_tqdm=False)[1]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    for c in first.outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS["array"])


def test_max_tokens_mid_structure_says_length(llm):
    out = llm.generate(PROMPTS[0], constrained(max_tokens=3, json=SCHEMAS["nested"]), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "length" and len(completion.token_ids) == 3
    assert completion.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)


def test_min_tokens_and_stop_strings_under_a_constraint(llm):
    choices = ["alpha", "beta"]
    # min_tokens above any choice's length: the grammar's end wins, the output is still a choice
    long_min = SamplingParams(
        temperature=0, max_tokens=20, min_tokens=15, structured_outputs={"choice": choices}
    )
    out = llm.generate(PROMPTS[0], long_min, use_tqdm=False)[0].outputs[0]
    assert out.text in choices and out.finish_reason == "stop"
    # a stop string inside the structure ends it there
    stop = SamplingParams(
        temperature=0,
        max_tokens=60,
        stop=['":'],
        structured_outputs={"json": SCHEMAS["enum"], "disable_any_whitespace": True},
    )
    out = llm.generate(PROMPTS[1], stop, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == '":' and out.text.startswith('{"color')


def test_preemption_chunked_prefill_and_prefix_cache_under_a_constraint(tiny_checkpoint, llm):
    schema = SCHEMAS["nested"]
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    shared = "the weather is nice today " * 3  # a common prefix of a few blocks, then distinct text
    prompts = [shared + f"and number {i} is " * 5 for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=so)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    block_bytes = llm.llm_engine.worker.kv_bytes_per_block()
    with LLM(
        tiny_checkpoint("llama"),
        dtype="float32",
        max_model_len=128,
        block_size=8,
        max_num_batched_tokens=24,  # prompts of ~40 tokens prefill in chunks
        kv_cache_memory_bytes=block_bytes // 2 * 20,  # 20 blocks of 8 for 4 sequences of ~80 tokens
    ) as small:
        outs = small.generate(prompts, params, use_tqdm=False)
        engine = small.llm_engine
        assert engine.scheduler.num_preemptions > 0
        again = small.generate(prompts[:1], params, use_tqdm=False)[0]
        assert again.num_cached_tokens > 0
        assert engine.kv.num_free_blocks == engine.num_blocks
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert again.outputs[0].token_ids == reference[0]
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), schema)


@pytest.mark.parametrize(
    "so, message",
    [
        ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "structured_outputs.json is invalid"),
        ({"json": {"type": "foo"}}, 'Unsupported type "foo"'),
        ({"regex": "[a-"}, "Unclosed '\\['"),
        ({"grammar": 'root ::= "a" | '}, "EBNF parser error"),
        ({"json": {"type": "object"}, "whitespace_pattern": " *"}, None),  # fine with guidance (auto)
    ],
)
def test_bad_constraints_are_refused_before_anything_runs(llm, so, message):
    engine = llm.llm_engine
    good = SamplingParams(temperature=0, max_tokens=4)
    bad = SamplingParams(max_tokens=4, structured_outputs=so)
    if message is None:
        pytest.importorskip("llguidance")
        assert llm.generate(PROMPTS[0], bad, use_tqdm=False)[0].outputs[0].text.startswith("{")
        return
    with pytest.raises(ValueError, match=message):
        llm.generate(PROMPTS[:2], [good, bad], use_tqdm=False)
    assert not engine.seqs and not engine.processor.requests and not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert len(llm.generate(PROMPTS[0], good, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_structural_tag_is_refused(llm):
    with pytest.raises(NotImplementedError, match="structural_tag"):
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs={"structural_tag": "{}"}), use_tqdm=False)


def test_grammar_cache_hits_for_the_same_spec(llm):
    cache = llm.llm_engine.structured.cache
    so = {"regex": "[0-9]{4}", "disable_any_whitespace": False}
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, structured_outputs=so), use_tqdm=False)
    misses, hits = cache.misses, cache.hits
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, structured_outputs=so), use_tqdm=False)
    assert cache.misses == misses and cache.hits > hits


def test_a_compiling_grammar_does_not_hold_up_the_batch(llm):
    """A request whose grammar is not compiled yet waits; the requests behind it run meanwhile."""
    engine = llm.llm_engine
    real = engine.structured._compiled
    gate: Future = Future()

    def gated(params):
        backend, future = real(params)
        gated_future: Future = Future()
        gate.add_done_callback(lambda _: gated_future.set_result(future.result()))
        return backend, gated_future

    engine.structured._compiled = gated
    try:
        engine.add_request("gated", None, [1, 2, 3], constrained(regex="[a-z]{3}"))
    finally:
        engine.structured._compiled = real
    engine.add_request("plain", None, [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    done = {}
    for _ in range(10):
        done.update({o.request_id: o for o in engine.step()})
    assert "plain" in done and "gated" not in done  # steps return while the grammar compiles
    assert engine.scheduler.waiting and engine.scheduler.waiting[0].request_id == "gated"
    gate.set_result(None)
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step()})
    assert re.fullmatch("[a-z]{3}", done["gated"].outputs[0].text)


def test_guidance_backend(tiny_checkpoint):
    """llguidance lets objects take unlisted keys unless told not to (a noise model would write one
    key forever), so the JSON requests here close them with disable_additional_properties."""
    pytest.importorskip("llguidance")
    with LLM(
        tiny_checkpoint("llama"),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory_bytes=2**24,
        structured_outputs_config={"backend": "guidance"},
    ) as llm:
        schema = SCHEMAS["nested"]
        lark = 'start: "(" NUM ("," NUM){1,3} ")"\nNUM: /[0-9]{1,2}/'
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=120,
                structured_outputs={
                    "json": schema,
                    "disable_any_whitespace": True,
                    "disable_additional_properties": True,
                },
            ),
            SamplingParams(
                temperature=1.0,
                seed=4,
                max_tokens=120,
                structured_outputs={
                    "json": schema,
                    "whitespace_pattern": r"[ ]?",
                    "disable_additional_properties": True,
                },
            ),
            SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": r"[a-c]{2,5}-\d{3}"}),
            SamplingParams(temperature=1.0, max_tokens=30, structured_outputs={"choice": ["up", "down"]}),
            SamplingParams(temperature=0, max_tokens=40, structured_outputs={"grammar": lark}),
        ]
        outs = [o.outputs[0] for o in llm.generate(PROMPTS + PROMPTS[:1], params, use_tqdm=False)]
        for out in outs[:2]:
            jsonschema.validate(json.loads(out.text), schema)
        assert re.fullmatch(r"[a-c]{2,5}-\d{3}", outs[2].text)
        assert outs[3].text in ("up", "down")
        assert re.fullmatch(r"\(\d{1,2}(,\d{1,2}){1,3}\)", outs[4].text)
        assert all(o.finish_reason == "stop" for o in outs)
        with pytest.raises(ValueError, match="structured_outputs.regex is invalid"):
            llm.generate("x", SamplingParams(structured_outputs={"regex": "[a-"}), use_tqdm=False)


@pytest.mark.gpu
def test_token_mask_on_cuda_never_waits_for_the_device(tokenizer_dir):
    """Filling the mask on the host, copying it and applying it in the sampler queue behind the
    device's work: CUDA's sync debug mode turns any wait into an error."""
    import torch
    from transformers import AutoTokenizer

    from kiln.runtime.sampler import SamplingRow, sample
    from kiln.runtime.sequence import Sequence
    from kiln.structured.manager import StructuredOutputManager
    from kiln.structured.params import StructuredOutputsConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = 128256  # a model vocabulary larger than the tokenizer's, as with padded embeddings
    manager = StructuredOutputManager(
        StructuredOutputsConfig(), tok, vocab, [tok.eos_token_id], torch.device("cuda")
    )
    seqs = []
    for i, so in enumerate([{"json": SCHEMAS["nested"]}, None, {"regex": "[a-c]{3}"}, None]):
        params = SamplingParams(temperature=1.0 if i % 2 else 0.0, structured_outputs=so)
        seq = Sequence(i, str(i), 0, [1, 2, 3], params, 16)
        if so is not None:
            seq.grammar = manager.new_state(params)
            seq.grammar.future.result()
            assert seq.grammar.ready
        seqs.append(seq)
    logits = torch.randn(len(seqs), vocab, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    rows = [SamplingRow(s.params) for s in seqs]
    try:
        mask = manager.token_mask(seqs).to_device(torch.device("cuda"))
        tokens = sample(logits, rows, gen, token_mask=mask).tokens
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens = tokens.tolist()
    assert tok.decode([tokens[0]]).startswith("{") and tok.decode([tokens[2]])[0] in "abc"
    manager.shutdown()


@pytest.mark.gpu
def test_structured_outputs_on_cuda_with_graphs_and_overlap(tiny_checkpoint):
    """The default GPU engine (compiled forward, CUDA graphs, Triton attention, overlapped steps)."""
    with LLM(
        tiny_checkpoint("llama"), dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**26
    ) as llm:
        plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        alone = llm.generate(PROMPTS[:2], plain, use_tqdm=False)
        requests = [(PROMPTS[0], plain), (PROMPTS[1], plain)]
        for name, schema in SCHEMAS.items():
            for draw in DRAWS:
                so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
                requests.append((name, SamplingParams(max_tokens=160, structured_outputs=so, **draw)))
        outs = llm.generate(
            [PROMPTS[0], PROMPTS[1]] + PROMPTS[2:3] * (len(requests) - 2),
            [r[1] for r in requests],
            use_tqdm=False,
        )
        assert [o.outputs[0].token_ids for o in outs[:2]] == [o.outputs[0].token_ids for o in alone]
        for (name, _), out in zip(requests[2:], outs[2:]):
            assert out.outputs[0].finish_reason == "stop", (name, out.outputs[0].text)
            jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[name])


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 30},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "hobbies"],
}


@pytest.mark.slow
def test_real_model_follows_schemas_and_choices(smollm_gguf):
    """SmolLM2-135M-Instruct with the default (free) JSON whitespace: valid, and sensible."""
    conversations = [
        [{"role": "user", "content": "Describe Alice, a 30 year old painter from Lyon, as JSON."}],
        [{"role": "user", "content": "Invent a person who likes chess and give their details as JSON."}],
        [{"role": "user", "content": "Is the sky blue on a clear day? Answer yes or no."}],
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=160, structured_outputs={"json": PERSON}),
        SamplingParams(temperature=0.7, seed=0, max_tokens=160, structured_outputs={"json": PERSON}),
        SamplingParams(temperature=0, max_tokens=8, structured_outputs={"choice": ["yes", "no"]}),
    ]
    with LLM(smollm_gguf, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=2**26) as llm:
        outs = [o.outputs[0] for o in llm.chat(conversations, params, use_tqdm=False)]
    for out in outs[:2]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert "Alice" in json.loads(outs[0].text)["name"]
    assert outs[2].text in ("yes", "no")


def test_shutdown_ends_the_grammar_threads(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**25)
    llm.generate(PROMPTS, constrained(max_tokens=20, regex="[a-z]{1,30}"), use_tqdm=False)
    engine = llm.llm_engine  # held, as a caller may: shutdown must end the threads, not the collector
    threads = list(engine.structured.cache.pool._threads)  # the compile pool's
    assert threads
    llm.shutdown()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    del engine
