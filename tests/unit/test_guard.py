"""The tool-call guard's policy on a real (tiny, random-weight) rater.

A random model's ratings are arbitrary but deterministic and always at least 1 (an all-zero
rating counts as severity 1), so threshold 0 makes every rated text risky and threshold 10 none:
that pins down every branch of the policy without depending on what the ratings are.
"""

from __future__ import annotations

import pydantic
import pytest

from ngsd_integrations import GatedDecoder, NGSDConfig, RiskPolicy
from ngsd_integrations.config import ToolGuardConfig
from ngsd_integrations.guard import ToolGuard, describe_tool_call, describe_tool_result
from ngsd_integrations.tools import ToolCall

SHELL = ToolCall("run_shell", {"command": "ls"}, id="call_1")
WEATHER = ToolCall("get_weather", {"city": "Paris"}, id="call_2")
CONVERSATION = [
    {"role": "user", "content": "old request"},
    {"role": "tool", "name": "search", "content": "an old result"},
    {"role": "user", "content": "List my files and tell me the weather"},
    {"role": "assistant", "content": "", "tool_calls": [WEATHER]},
    {"role": "tool", "name": "get_weather", "content": "18C and sunny"},
]


@pytest.fixture(scope="module")
def decoder(tiny_adapter_pair):
    return GatedDecoder(tiny_adapter_pair, NGSDConfig())


def guard(decoder, **config) -> ToolGuard:
    return ToolGuard(decoder, ToolGuardConfig(**{"enabled": True, **config}))


def test_descriptions_carry_request_call_and_result():
    text = describe_tool_call("send_email", {"to": "a@b.example", "body": "hi"}, "  Mail Ann  ")
    assert text == 'User request: Mail Ann\nThe assistant calls the tool send_email with arguments {"to": "a@b.example", "body": "hi"}'
    long = describe_tool_result("fetch_page", "a" * 1000 + "INJECTED" + "b" * 1000)
    assert long.startswith("Content returned by the tool fetch_page:\naaa") and long.endswith("bbb")
    assert "[...]" in long and len(long) < 1600


def test_block_replaces_all_calls_with_the_refusal(decoder):
    context = guard(decoder, result_threshold=10.0).prepare(CONVERSATION)
    review = guard(decoder, threshold=0.0, sensitive_threshold=0.0).review(context, [SHELL, WEATHER])
    assert review.blocked and review.calls == [] and review.refusal == ToolGuardConfig().refusal
    calls = [v for v in review.verdicts if v.kind == "tool_call"]
    assert [(v.name, v.call_id, v.risky, v.action) for v in calls] == [
        ("run_shell", "call_1", True, "block"), ("get_weather", "call_2", True, "block")
    ]
    assert all(v.risk >= 1 and set(v.scores) == {"severity", "actionability", "evasion", "targeting"} for v in calls)
    meta = review.to_metadata()
    assert meta["blocked"] is True and meta["flagged"] == ["run_shell", "get_weather"]


def test_flag_lets_risky_calls_out_and_allow_is_not_rated(decoder):
    g = guard(decoder, threshold=0.0, sensitive_threshold=0.0, result_threshold=10.0,
              actions={"run_shell": "flag", "get_weather": "allow"})
    review = g.review(g.prepare(CONVERSATION), [SHELL, WEATHER])
    assert not review.blocked and review.calls == [SHELL, WEATHER]
    shell, weather = [v for v in review.verdicts if v.kind == "tool_call"]
    assert shell.risky and shell.action == "flag"
    assert weather.action == "allow" and weather.risk == 0.0 and not weather.risky and weather.scores == {}


def test_nothing_is_blocked_below_the_threshold(decoder):
    review = guard(decoder, threshold=10.0, sensitive_threshold=10.0, result_threshold=10.0).review(
        guard(decoder, result_threshold=10.0).prepare(CONVERSATION), [SHELL]
    )
    assert not review.blocked and review.calls == [SHELL] and review.flagged == []


def test_sensitive_tools_face_the_stricter_threshold(decoder):
    g = guard(decoder, threshold=10.0, sensitive_threshold=0.0, sensitive_tools=("run_shell",), result_threshold=10.0)
    context = g.prepare(CONVERSATION)
    assert g.review(context, [WEATHER]).calls == [WEATHER]
    review = g.review(context, [WEATHER, SHELL])
    assert review.blocked and [v.threshold for v in review.verdicts if v.kind == "tool_call"] == [10.0, 0.0]


def test_only_this_steps_tool_results_are_rated_and_a_risky_one_taints_the_step(decoder):
    g = guard(decoder, threshold=10.0, sensitive_threshold=0.0, result_threshold=0.0)
    context = g.prepare(CONVERSATION)
    assert context.request == "List my files and tell me the weather"
    assert [(v.kind, v.name) for v in context.results] == [("tool_result", "get_weather")]
    assert context.tainted and g.alpha_for(context) == decoder.config.risk.high_alpha
    review = g.review(context, [WEATHER])  # an ordinary tool, judged strictly after a risky result
    assert review.blocked and review.verdicts[-1].threshold == 0.0

    calm = guard(decoder, result_threshold=10.0)
    assert not calm.prepare(CONVERSATION).tainted and calm.alpha_for(calm.prepare(CONVERSATION)) is None
    assert guard(decoder, rate_tool_results=False).prepare(CONVERSATION).results == []


def test_disabled_guard_passes_calls_untouched(decoder):
    g = guard(decoder, enabled=False, threshold=0.0, sensitive_threshold=0.0)
    review = g.review(g.prepare(CONVERSATION), [SHELL])
    assert review.calls == [SHELL] and review.verdicts == [] and not review.blocked


def test_ratings_are_cached_by_text(decoder, monkeypatch):
    g = guard(decoder)
    calls = []
    real_rate = decoder.rate
    monkeypatch.setattr(decoder, "rate", lambda text: calls.append(text) or real_rate(text))
    for _ in range(3):
        g.prepare(CONVERSATION)
    assert len(calls) == 1


def test_auto_follows_the_decoders_risk_rating(decoder, tiny_adapter_pair):
    assert not decoder.risk_enabled and not ToolGuard(decoder).enabled  # no probe: no rating, no guard
    rating = GatedDecoder(tiny_adapter_pair, NGSDConfig(risk=RiskPolicy(enabled=True)))
    assert ToolGuard(rating).enabled and not ToolGuard(rating, ToolGuardConfig(enabled=False)).enabled


def test_config_errors_name_the_field_and_value():
    with pytest.raises(pydantic.ValidationError, match="sensitive_threshold=7.0 must not exceed threshold=6.0"):
        ToolGuardConfig(sensitive_threshold=7.0)
    with pytest.raises(pydantic.ValidationError, match="actions"):
        ToolGuardConfig(actions={"run_shell": "maybe"})
    with pytest.raises(pydantic.ValidationError, match="threshold"):
        ToolGuardConfig(threshold=11)
