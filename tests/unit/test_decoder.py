"""Exactness and behaviour of the gated decoding loop on tiny random-weight models."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ngsd_integrations import (
    GatedDecoder,
    GateConfig,
    GenerationOptions,
    GrammarConstraint,
    NGSDConfig,
    PromptTooLongError,
    RiskPolicy,
)
from ngsd_integrations.blend import union_top_k_blend

PROMPTS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, then explain why the sky looks blue."}],
    "Once upon a time",
]


def decoder_for(pair, mode: str, alpha: float = 0.9, **gate) -> GatedDecoder:
    config = NGSDConfig(gate=GateConfig(mode=mode, alpha=alpha, **gate), risk=RiskPolicy(enabled=False))
    return GatedDecoder(pair, config)


def plain_greedy(pair, decoder: GatedDecoder, prompt, max_new_tokens: int) -> list[int]:
    """``model.generate()`` of the base alone (adapter disabled), greedy, with its own cache."""
    ids = decoder.tokenizer.encode(decoder.render(prompt), add_special_tokens=isinstance(prompt, str), return_tensors="pt")
    model = pair.base
    if pair.is_adapter_pair:
        with model.disable_adapter():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("pair_name", ["tiny_adapter_pair", "tiny_separate_pair"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["chat", "system", "raw"])
def test_gate_that_never_fires_equals_plain_greedy_generate(request, pair_name, prompt):
    pair = request.getfixturevalue(pair_name)
    decoder = decoder_for(pair, "never")
    result = decoder.generate(prompt, GenerationOptions(max_new_tokens=24))
    assert result.token_ids == plain_greedy(pair, decoder, prompt, 24)
    assert result.trace.spike_count == 0
    assert max(result.trace.divergence) > 0.1  # the expert really disagrees: the gate is what kept it out


def direct_blend_tokens(pair, decoder: GatedDecoder, prompt, alpha: float, k: int, steps: int) -> list[int]:
    """Recompute the whole sequence for both models every step and blend (no cache)."""
    ids = decoder.tokenizer.encode(decoder.render(prompt), add_special_tokens=isinstance(prompt, str))
    out: list[int] = []
    for _ in range(steps):
        x = torch.tensor([ids + out])
        with torch.inference_mode():
            if pair.is_adapter_pair:
                with pair.base.disable_adapter():
                    lb = pair.base(input_ids=x).logits[0, -1].float()
                le = pair.base(input_ids=x).logits[0, -1].float()
            else:
                lb = pair.base(input_ids=x).logits[0, -1].float()
                le = pair.expert(input_ids=x).logits[0, -1].float()
        scores, _ = union_top_k_blend(lb.softmax(-1)[None], le.softmax(-1)[None], alpha, k)
        token = int(scores.argmax())
        out.append(token)
        if token == 2:
            break
    return out


@pytest.mark.parametrize("pair_name", ["tiny_adapter_pair", "tiny_separate_pair"])
def test_gate_that_always_fires_equals_direct_blend(request, pair_name):
    pair = request.getfixturevalue(pair_name)
    decoder = decoder_for(pair, "always", alpha=0.7, top_k=8)
    prompt = PROMPTS[0]
    result = decoder.generate(prompt, GenerationOptions(max_new_tokens=16))
    assert result.trace.spike_count == len(result.token_ids)
    assert result.token_ids == direct_blend_tokens(pair, decoder, prompt, 0.7, 8, 16)


@pytest.mark.parametrize("pair_name", ["tiny_adapter_pair", "tiny_separate_pair"])
def test_joined_stream_equals_generate(request, pair_name):
    pair = request.getfixturevalue(pair_name)
    decoder = decoder_for(pair, "lif")
    options = GenerationOptions(max_new_tokens=30)
    events = list(decoder.stream(PROMPTS[1], options))
    result = decoder.generate(PROMPTS[1], options)
    assert "".join(e.text for e in events) == result.text
    assert [e.token_id for e in events] == result.token_ids
    assert [e.spike for e in events] == result.trace.spikes
    assert events[-1].finish_reason == result.finish_reason
    assert all(e.finish_reason is None for e in events[:-1])


@pytest.mark.parametrize("pair_name", ["tiny_adapter_pair", "tiny_separate_pair"])
def test_batch_equals_one_by_one(request, pair_name):
    pair = request.getfixturevalue(pair_name)
    decoder = decoder_for(pair, "lif", tau=4.0, theta=0.8)
    options = GenerationOptions(max_new_tokens=20)
    batched = decoder.generate_batch(PROMPTS, options)
    for prompt, together in zip(PROMPTS, batched):
        alone = decoder.generate(prompt, options)
        assert together.token_ids == alone.token_ids
        assert together.trace.spikes == alone.trace.spikes
    assert any(g.trace.spike_count for g in batched) and not all(all(g.trace.spikes) for g in batched)


def test_concurrent_callers_get_their_own_generation(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "lif", tau=4.0, theta=0.8)
    options = GenerationOptions(max_new_tokens=12)
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(6)]
    sequential = [decoder.generate(p, options) for p in prompts]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda p: decoder.generate(p, options), prompts))
    for a, b in zip(sequential, concurrent):
        assert a.token_ids == b.token_ids and a.trace.potential == b.trace.potential


def test_stop_string_spanning_tokens_stops_and_never_leaks(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "never")
    full = decoder.generate(PROMPTS[0], GenerationOptions(max_new_tokens=30))
    tok = decoder.tokenizer
    pieces = [tok.decode(full.token_ids[: i + 1], skip_special_tokens=True) for i in range(len(full.token_ids))]
    # A stop string made of the end of token 5 and the start of token 6 crosses a boundary.
    boundary = len(pieces[5])
    stop = full.text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and full.text.find(stop) >= 0
    expected = full.text[: full.text.find(stop)]
    options = GenerationOptions(max_new_tokens=30, stop=(stop,))
    result = decoder.generate(PROMPTS[0], options)
    assert result.text == expected and result.finish_reason == "stop"
    streamed = [e.text for e in decoder.stream(PROMPTS[0], options)]
    assert "".join(streamed) == expected
    assert len(result.token_ids) < len(full.token_ids)


def test_sampling_is_seeded(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "lif", tau=4.0, theta=0.8)
    opts = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50)
    a = decoder.generate(PROMPTS[0], GenerationOptions(seed=3, **opts))
    b = decoder.generate(PROMPTS[0], GenerationOptions(seed=3, **opts))
    c = decoder.generate(PROMPTS[0], GenerationOptions(seed=4, **opts))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_max_new_tokens_and_ignore_eos(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "lif")
    result = decoder.generate(PROMPTS[2], GenerationOptions(max_new_tokens=7, ignore_eos=True))
    assert len(result.token_ids) == 7 and result.finish_reason == "length"
    assert result.usage == {"prompt_tokens": result.trace.prompt_tokens, "completion_tokens": 7,
                            "total_tokens": result.trace.prompt_tokens + 7}


def test_cancel_stops_within_one_token(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "lif")
    cancel = threading.Event()
    events = []
    for event in decoder.stream(PROMPTS[2], GenerationOptions(max_new_tokens=50, ignore_eos=True), cancel=cancel):
        events.append(event)
        if len(events) == 3:
            cancel.set()
    assert len(events) == 4 and events[-1].finish_reason == "cancelled"


def test_grammar_constraint_gives_valid_json(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "lif", tau=4.0, theta=0.8)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    constraint = GrammarConstraint.from_json_schema(decoder.tokenizer, decoder.vocab_size, schema)
    result = decoder.generate(PROMPTS[0], GenerationOptions(max_new_tokens=60), constraint=constraint)
    value = json.loads(result.text)
    assert set(value) == {"city", "unit"} and value["unit"] in ("C", "F")
    assert result.finish_reason == "stop"


def test_bad_input_is_named(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "lif")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        decoder.generate("   ")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decoder.generate_batch(["hello", []])
    with pytest.raises(PromptTooLongError, match=r"max_new_tokens=100"):
        decoder.generate("word " * 600, GenerationOptions(max_new_tokens=100))
    with pytest.raises(ValueError, match="alpha=1.5"):
        decoder.generate("hello", alpha=1.5)
    with pytest.raises(ValueError, match="must be a non-empty list"):
        decoder.generate_batch("hello")


def test_assistant_prefix_is_forced_but_not_returned(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "never")
    prefix = "Sure, here is"
    result = decoder.generate(PROMPTS[0], GenerationOptions(max_new_tokens=10), assistant_prefix=prefix)
    ids = decoder.tokenizer.encode(decoder.render(PROMPTS[0]) + prefix, return_tensors="pt")
    with tiny_adapter_pair.base.disable_adapter():
        expected = tiny_adapter_pair.base.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert result.token_ids == expected


def test_stream_returns_the_generation(tiny_adapter_pair):
    decoder = decoder_for(tiny_adapter_pair, "lif")
    options = GenerationOptions(max_new_tokens=9)

    def consume():
        return (yield from decoder.stream(PROMPTS[0], options))

    events = []
    gen = consume()
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        result = stop.value
    assert result.token_ids == [e.token_id for e in events]
    assert events[-1].trace is result.trace and all(e.trace is None for e in events[:-1])


# ---------------------------------------------------------------- refusals inside grammar-bound output
def _push_all(row, tokenizer, text):
    for token in tokenizer.encode(text, add_special_tokens=False):
        row.push(token, False)
        if row.finish_reason:
            break


@pytest.mark.parametrize("spiked, expected", [(True, "refused"), (False, None)])
def test_a_gate_refusal_ends_grammar_bound_output(smol_tokenizer, spiked, expected):
    from ngsd_integrations.constraints import GrammarConstraint
    from ngsd_integrations.decoder import _Row
    from ngsd_integrations.early_stop import refusal_excerpt
    from ngsd_integrations.trace import SafetyTrace

    schema = {"type": "object", "properties": {"body": {"type": "string"}}, "required": ["body"]}
    grammar = GrammarConstraint.from_json_schema(smol_tokenizer, len(smol_tokenizer), schema).new_state()
    trace = SafetyTrace(alpha=0.9)
    trace.record(0, 0.8, 1.2, spiked)
    row = _Row(tokenizer=smol_tokenizer, stop=(), trace=trace, early_stop=None, grammar=grammar)
    _push_all(row, smol_tokenizer, '{"body": "Sure. I\'m sorry, but I can\'t help with that. It could')
    assert row.finish_reason == expected  # without a spike the same words are the model's own text
    if spiked:
        assert refusal_excerpt(row.text) == "I'm sorry, but I can't help with that."


def test_refusal_excerpt_drops_the_json_around_it():
    from ngsd_integrations.early_stop import refusal_excerpt

    call = '<tool_call>{"name": "send_email", "arguments": {"to": "x@y.example", "body": "Hi. I\\u2019m sorry, I can\'t send that.", "cc": "'
    assert refusal_excerpt(call).startswith("I") and refusal_excerpt(call).endswith("send that.")
    assert refusal_excerpt("no refusal here ") == "no refusal here"
