"""StructuredOutputsParams / StructuredOutputsConfig: vLLM's fields, exactly one constraint, clear errors."""

import pytest

from kiln import LLM, SamplingParams, StructuredOutputsConfig, StructuredOutputsParams
from kiln.structured.params import CONSTRAINT_FIELDS
from kiln.structured.spec import GrammarSpec


def test_fields_and_defaults_follow_vllm():
    p = StructuredOutputsParams(regex="a+")
    assert (p.json, p.choice, p.grammar, p.json_object, p.structural_tag) == (None,) * 5
    assert (p.disable_any_whitespace, p.disable_additional_properties, p.whitespace_pattern) == (
        False,
        False,
        None,
    )
    assert p.kind == "regex"
    assert StructuredOutputsParams(json_object=True).kind == "json_object"


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="none are specified"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match=r"multiple are specified: \['json', 'regex'\]"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    assert set(CONSTRAINT_FIELDS) >= {"json", "regex", "choice", "grammar", "json_object"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
        ({"json": [1, 2]}, "must be a JSON schema object"),
        ({"regex": 5}, "structured_outputs.regex must be a string"),
        ({"choice": []}, "non-empty list of strings"),
        ({"choice": "yes"}, "non-empty list of strings"),
        ({"choice": ["a", 3]}, "must hold strings, got 3"),
        ({"grammar": "  "}, "grammar is empty"),
        ({"json_object": False}, "json_object must be True or None"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_takes_a_dict():
    params = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert params.structured_outputs == StructuredOutputsParams(choice=["yes", "no"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['regexp'\]"):
        SamplingParams(structured_outputs={"regexp": "a"})
    with pytest.raises(ValueError, match="must be a StructuredOutputsParams or a dict"):
        SamplingParams(structured_outputs="a+")
    assert params.clone().structured_outputs == params.structured_outputs


def test_config_parse_and_errors():
    assert StructuredOutputsConfig.parse(None).backend == "auto"
    assert StructuredOutputsConfig.parse({"backend": "guidance"}).backend == "guidance"
    with pytest.raises(ValueError, match="backend must be one of"):
        StructuredOutputsConfig.parse({"backend": "outlines2"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['backends'\]"):
        StructuredOutputsConfig.parse({"backends": "xgrammar"})
    with pytest.raises(NotImplementedError, match="reasoning_parser"):
        StructuredOutputsConfig.parse({"reasoning_parser": "deepseek_r1"})


def test_llm_checks_the_config_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        LLM(str(tmp_path / "missing"), structured_outputs_config={"backend": "nope"})


def test_spec_is_a_stable_cache_key():
    config = StructuredOutputsConfig()
    a = GrammarSpec.from_params(StructuredOutputsParams(json={"type": "object", "required": []}), config)
    b = GrammarSpec.from_params(StructuredOutputsParams(json='{"type": "object",  "required": []}'), config)
    assert a == b and hash(a) == hash(b)
    c = GrammarSpec.from_params(StructuredOutputsParams(json_object=True), config)
    assert c.kind == "json" and c != a
    strict = GrammarSpec.from_params(
        StructuredOutputsParams(json={"type": "object"}), StructuredOutputsConfig(disable_any_whitespace=True)
    )
    assert not strict.any_whitespace


def test_disable_additional_properties_closes_every_object():
    schema = {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "properties": {"type": "string"},
            "open": {"type": "object", "additionalProperties": True},
        },
        "$defs": {"d": {"type": "object"}},
    }
    spec = GrammarSpec.from_params(
        StructuredOutputsParams(json=schema, disable_additional_properties=True), StructuredOutputsConfig()
    )
    closed = spec.schema()
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]  # a string property
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["d"]["additionalProperties"] is False
    open_spec = GrammarSpec.from_params(StructuredOutputsParams(json=schema), StructuredOutputsConfig())
    assert open_spec.schema() == schema
