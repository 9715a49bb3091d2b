"""Tool rendering, grammars and parsing (real SmolLM2 tokenizer, tiny random models)."""

from __future__ import annotations

import json

import pytest

from ngsd_integrations.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    ToolSpec,
    parse_tool_calls,
    prepare_messages,
    structured_output_constraint,
    template_supports_tools,
    tool_call_constraint,
)

WEATHER = ToolSpec(
    "get_weather",
    "Get the weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city"],
    },
)
UNIT_ONLY = ToolSpec(
    "set_unit", "Set the unit", {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"]}
)
NO_ARGS = ToolSpec("now", "The current time", {})
VOCAB = 49152


def _accepts(constraint, text: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(constraint.compiled)
    return matcher.accept_string(text)


class _ToolTemplateTokenizer:
    """A tokenizer stand-in whose template renders tools (like Qwen's)."""

    chat_template = "{% for m in messages %}{{ m.role }}{% endfor %}{% if tools %}{{ tools }}{% endif %}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, tools=None):
        text = "|".join(f"{m['role']}:{m.get('content')}" for m in messages)
        return text + (json.dumps(tools) if tools else "")


def test_tool_spec_roundtrips_through_openai_form():
    spec = ToolSpec.from_openai(WEATHER.to_openai())
    assert spec == WEATHER
    assert WEATHER.to_openai()["function"]["name"] == "get_weather"
    with pytest.raises(ValueError, match="name"):
        ToolSpec("", "x", {})


def test_smollm2_template_has_no_tool_support(smol_tokenizer):
    assert template_supports_tools(smol_tokenizer) is False
    assert template_supports_tools(_ToolTemplateTokenizer()) is True


def test_prepare_messages_merges_roles_and_renders_tools_in_system(smol_tokenizer):
    call = ToolCall("get_weather", {"city": "Paris"}, "call_1")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": '{"rain": false}', "tool_call_id": "call_1"},
    ]
    out, template_tools = prepare_messages(messages, [WEATHER], smol_tokenizer)
    assert template_tools is None
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nBe kind.")
    assert '"name": "get_weather"' in out[0]["content"] and TOOL_CALL_OPEN in out[0]["content"]
    assert out[1]["content"] == "Hi\n\nWeather in Paris?"
    assert out[2]["content"] == f'{TOOL_CALL_OPEN}{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}{TOOL_CALL_CLOSE}'
    # Results name their tool (looked up by call id) and JSON results stay JSON.
    assert '<tool_response>{"name": "get_weather", "content": "18 C"}</tool_response>' in out[3]["content"]
    assert '"content": {"rain": false}' in out[3]["content"]
    smol_tokenizer.apply_chat_template(out, tokenize=False, add_generation_prompt=True)


def test_prepare_messages_with_tool_aware_template_keeps_structure():
    call = ToolCall("get_weather", {"city": "Paris"}, "call_1")
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    ]
    out, template_tools = prepare_messages(messages, [WEATHER], _ToolTemplateTokenizer())
    assert template_tools == [WEATHER.to_openai()]
    assert out[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1", "name": "get_weather"}


def test_prepare_messages_rejects_unknown_roles(smol_tokenizer):
    with pytest.raises(ValueError, match="role"):
        prepare_messages([{"role": "narrator", "content": "x"}], None, smol_tokenizer)


@pytest.mark.parametrize(
    ("choice", "text", "ok"),
    [
        ("auto", "Just text.", True),
        ("auto", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', True),
        ("auto", '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>', False),
        ("auto", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', False),
        ("auto", "<tool_response>copied</tool_response>", False),
        ("required", "Just text.", False),
        ("required", '<tool_call>{"name": "now", "arguments": {}}</tool_call>', True),
        ("any", '<tool_call>{"name": "get_weather", "arguments": {"city": "X", "unit": "K"}}</tool_call>', False),
        ("now", '<tool_call>{"name": "get_weather", "arguments": {"city": "X"}}</tool_call>', False),
        ("now", '<tool_call>{"name": "now", "arguments": {}}</tool_call>', True),
    ],
)
def test_tool_call_grammar(smol_tokenizer, choice, text, ok):
    constraint = tool_call_constraint(smol_tokenizer, VOCAB, [WEATHER, NO_ARGS], choice)
    assert _accepts(constraint, text) is ok


def test_tool_call_constraint_none_and_errors(smol_tokenizer):
    assert tool_call_constraint(smol_tokenizer, VOCAB, [WEATHER], "none") is None
    with pytest.raises(ValueError, match="tool_choice='missing'"):
        tool_call_constraint(smol_tokenizer, VOCAB, [WEATHER], "missing")
    with pytest.raises(ValueError, match="empty"):
        tool_call_constraint(smol_tokenizer, VOCAB, [], "required")
    # Compiled grammars are cached: the same request returns the same object.
    assert tool_call_constraint(smol_tokenizer, VOCAB, [WEATHER], "auto") is tool_call_constraint(
        smol_tokenizer, VOCAB, [WEATHER], "auto"
    )


def test_structured_output_constraint(smol_tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    constraint = structured_output_constraint(smol_tokenizer, VOCAB, schema)
    assert _accepts(constraint, '{"n": 3}')
    assert not _accepts(constraint, '{"n": "three"}')


def test_parse_tool_calls():
    text = (
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}), ("now", {})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_parse_tool_calls_keeps_malformed_and_drops_truncated():
    content, calls = parse_tool_calls("a <tool_call>not json</tool_call> b")
    assert calls == [] and content == "a <tool_call>not json</tool_call> b"
    content, calls = parse_tool_calls('Answer. <tool_call>{"name": "now", "argu')
    assert calls == [] and content == "Answer. "
    assert parse_tool_calls("plain") == ("plain", [])


@pytest.mark.parametrize("choice", ["required", "set_unit"])
def test_forced_call_from_a_random_model_is_valid(tiny_separate_pair, choice):
    """Even a random-weight model writes a parseable, schema-valid call under the grammar."""
    from ngsd_integrations import GatedDecoder, GenerationOptions, NGSDConfig, RiskPolicy

    decoder = GatedDecoder(tiny_separate_pair, NGSDConfig(risk=RiskPolicy(enabled=False)))
    messages, _ = prepare_messages([{"role": "user", "content": "Use Celsius."}], [UNIT_ONLY, NO_ARGS], decoder.tokenizer)
    constraint = tool_call_constraint(decoder.tokenizer, decoder.vocab_size, [UNIT_ONLY, NO_ARGS], choice)
    generation = decoder.generate(messages, GenerationOptions(max_new_tokens=80), constraint=constraint)
    assert generation.finish_reason == "stop"
    content, calls = parse_tool_calls(generation.text)
    assert content == "" and len(calls) == 1
    if choice == "set_unit":
        assert calls[0].name == "set_unit" and calls[0].arguments["unit"] in ("C", "F")
