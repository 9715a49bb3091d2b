"""SafeDecoding's rule against a direct computation, and its KV-cached loop against uncached forwards."""

from __future__ import annotations

import pytest
import torch

from ngsd_integrations import GateConfig, GatedDecoder, GenerationOptions, NGSDConfig, RiskPolicy
from ngsd_integrations.evaluation.safedecoding import SafeDecoder, safedecoding_distribution


def direct_rule(p_base, p_expert, alpha, top_k, min_common):
    """The rule as the paper states it: grow k from top_k until the top-k lists share min_common tokens."""
    order_b = sorted(range(len(p_base)), key=lambda i: (-float(p_base[i]), i))
    order_e = sorted(range(len(p_expert)), key=lambda i: (-float(p_expert[i]), i))
    k = top_k
    while True:
        common = set(order_b[:k]) & set(order_e[:k])
        if len(common) >= min_common:
            break
        k += 1
    ids = sorted(common)
    q = [max(float(p_base[i]) + alpha * (float(p_expert[i]) - float(p_base[i])), 1e-8) for i in ids]
    total = sum(q)
    return ids, [x / total for x in q]


def synthetic(seed, vocab=300, sharpness=3.0, disagree=False):
    g = torch.Generator().manual_seed(seed)
    logits_b = torch.randn(vocab, generator=g) * sharpness
    logits_e = torch.randn(vocab, generator=g) * sharpness if disagree else logits_b + torch.randn(vocab, generator=g)
    return logits_b.softmax(-1), logits_e.softmax(-1)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("disagree", [False, True])
def test_rule_matches_direct_computation(seed, disagree):
    p_base, p_expert = synthetic(seed, disagree=disagree)
    ids, probs = safedecoding_distribution(p_base, p_expert, alpha=3.0, top_k=10, min_common=5)
    want_ids, want_probs = direct_rule(p_base, p_expert, 3.0, 10, 5)
    assert ids.tolist() == want_ids
    assert torch.allclose(probs, torch.tensor(want_probs, dtype=probs.dtype), atol=1e-6)
    assert len(want_ids) >= 5


def test_k_grows_until_enough_common_tokens():
    # Opposite rankings: the top-10 lists share nothing, so k must grow.
    vocab = 40
    p_base = torch.linspace(1, 2, vocab).softmax(-1)
    p_expert = torch.linspace(2, 1, vocab).softmax(-1)
    ids, _ = safedecoding_distribution(p_base, p_expert, top_k=10, min_common=5)
    assert ids.tolist() == direct_rule(p_base, p_expert, 3.0, 10, 5)[0]
    assert len(ids) >= 5


def test_alpha_amplifies_the_expert_and_floors_negatives():
    p_base = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    p_expert = torch.tensor([0.05, 0.05, 0.1, 0.3, 0.5])
    ids, probs = safedecoding_distribution(p_base, p_expert, alpha=3.0, top_k=5, min_common=5)
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert probs.argmax() == 4  # the expert's favourite wins
    assert probs[0] == pytest.approx(1e-8 / float((torch.tensor([1e-8, 1e-8, 0.1, 0.8, 1.4])).sum()), rel=1e-4)
    assert probs.sum() == pytest.approx(1.0)


def test_rule_does_not_modify_inputs_and_validates():
    p_base, p_expert = synthetic(0)
    before = (p_base.clone(), p_expert.clone())
    safedecoding_distribution(p_base, p_expert)
    assert torch.equal(p_base, before[0]) and torch.equal(p_expert, before[1])
    with pytest.raises(ValueError, match="top_k=0"):
        safedecoding_distribution(p_base, p_expert, top_k=0)
    with pytest.raises(ValueError, match="1-D"):
        safedecoding_distribution(p_base.view(1, -1), p_expert.view(1, -1))


MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


def test_base_alone_equals_the_gate_that_never_fires(tiny_adapter_pair):
    never = GatedDecoder(tiny_adapter_pair, NGSDConfig(gate=GateConfig(mode="never"), risk=RiskPolicy(enabled=False)))
    want = never.generate(MESSAGES, GenerationOptions(max_new_tokens=10), assistant_prefix="Sure,")
    got = SafeDecoder(tiny_adapter_pair, first_tokens=0).generate(MESSAGES, 10, "Sure,")
    assert got.token_ids == want.token_ids and got.text == want.text


def _full_logits(pair, ids, adapter):
    model = pair.base
    with torch.inference_mode():
        if adapter:
            return model(input_ids=torch.tensor([ids])).logits[0].float()
        with model.disable_adapter():
            return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("first_tokens", [1, 2, 4])
def test_cached_loop_matches_uncached_computation(tiny_adapter_pair, first_tokens):
    pair = tiny_adapter_pair
    decoder = SafeDecoder(pair, first_tokens=first_tokens)
    out = decoder.generate(MESSAGES, 8)
    prompt = decoder._encode(MESSAGES, pair.tokenizer, "")
    full = prompt + out.token_ids
    base_logits = _full_logits(pair, full, adapter=False)
    expert_logits = _full_logits(pair, full, adapter=True)
    for t, token in enumerate(out.token_ids):
        pos = len(prompt) + t - 1
        if t < first_tokens:
            ids, probs = safedecoding_distribution(base_logits[pos].softmax(-1), expert_logits[pos].softmax(-1))
            assert token == int(ids[probs.argmax()])
        else:
            assert token == int(base_logits[pos].argmax())
    assert out.trace.spikes == [t < first_tokens for t in range(len(out.token_ids))]


def test_separate_expert_pair(tiny_separate_pair):
    out = SafeDecoder(tiny_separate_pair, first_tokens=2).generate(MESSAGES, 5)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_guidance_needs_an_expert(tiny_separate_pair):
    from ngsd_integrations.models import ModelPair

    alone = ModelPair(base=tiny_separate_pair.base, tokenizer=tiny_separate_pair.tokenizer)
    with pytest.raises(ValueError, match="needs an expert"):
        SafeDecoder(alone, first_tokens=2)
    assert SafeDecoder(alone, first_tokens=0).generate(MESSAGES, 3).token_ids
