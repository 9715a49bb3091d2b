"""Properties of the divergences, the LIF neuron, the blend, early stop and the configuration."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ngsd_integrations import EarlyStopConfig, GateConfig, GenerationOptions, NGSDConfig, RiskPolicy
from ngsd_integrations.blend import union_top_k_blend
from ngsd_integrations.divergence import get_divergence, jensen_shannon, kl_divergence, total_variation
from ngsd_integrations.early_stop import EarlyStopper, is_refusal_or_junk
from ngsd_integrations.gate import LIFGate


def random_rows(seed: int, n: int = 16, vocab: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * 3).softmax(-1)


@pytest.mark.parametrize("fn", [total_variation, jensen_shannon])
def test_bounded_divergences(fn):
    p, q = random_rows(0), random_rows(1)
    assert torch.allclose(fn(p, p), torch.zeros(len(p)), atol=1e-6)
    assert torch.allclose(fn(p, q), fn(q, p), atol=1e-6)
    d = fn(p, q)
    assert (d >= 0).all() and (d <= 1 + 1e-6).all()
    disjoint_p, disjoint_q = torch.zeros(1, 4), torch.zeros(1, 4)
    disjoint_p[0, 0], disjoint_q[0, 3] = 1.0, 1.0
    assert fn(disjoint_p, disjoint_q).item() == pytest.approx(1.0, abs=1e-5)


def test_total_variation_value_and_kl():
    p, q = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.25, 0.25, 0.5]])
    assert total_variation(p, q).item() == pytest.approx(0.5)
    assert kl_divergence(p, q).item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert kl_divergence(p, p).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="divergence='hellinger'"):
        get_divergence("hellinger")


def run_gate(config: GateConfig, d: float, steps: int = 60) -> list[bool]:
    gate = LIFGate(config, batch_size=1)
    return [bool(gate.step(torch.tensor([d]))[0]) for _ in range(steps)]


def test_neuron_silent_up_to_one_over_tau():
    assert not any(run_gate(GateConfig(), 1 / 8))
    assert not any(run_gate(GateConfig(), 0.1, steps=500))
    assert any(run_gate(GateConfig(), 0.14))


def test_neuron_fires_every_step_from_0_475():
    spikes = run_gate(GateConfig(), 0.475)
    assert all(spikes[2:])  # v starts at 0: the first step or two integrate up to theta
    assert not all(run_gate(GateConfig(), 0.45)[2:])


def test_neuron_reset_and_per_row_state():
    gate = LIFGate(GateConfig(), batch_size=2)
    spike, potential = gate.step(torch.tensor([1.2, 0.0]))
    assert spike.tolist() == [True, False]
    assert potential.tolist() == pytest.approx([1.2, 0.0])
    assert gate.potential.tolist() == pytest.approx([0.6 * 1.2, 0.0])  # soft reset towards v_reset=0


def test_always_and_never_modes_still_integrate():
    assert all(run_gate(GateConfig(mode="always"), 0.0, steps=5))
    assert not any(run_gate(GateConfig(mode="never"), 1.0, steps=5))


def test_blend_identities_and_no_mutation():
    p, q = random_rows(2, 4, 50), random_rows(3, 4, 50)
    p0, q0 = p.clone(), q.clone()
    scores, cand = union_top_k_blend(p, q, 0.0, 5)
    assert torch.equal(scores, p)
    scores, cand = union_top_k_blend(p, q, 1.0, 5)
    assert torch.allclose(scores[cand], q[cand], atol=1e-6) and torch.equal(scores[~cand], p[~cand])
    assert torch.equal(p, p0) and torch.equal(q, q0)
    assert (cand.sum(-1) >= 5).all() and (cand.sum(-1) <= 10).all()
    per_row, _ = union_top_k_blend(p, q, torch.tensor([0.0, 0.5, 1.0, 0.25]), 5)
    assert torch.equal(per_row[0], p[0])


def test_blend_promotes_expert_token_only_among_candidates():
    p = torch.tensor([[0.6, 0.3, 0.1, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.1, 0.9]])
    scores, cand = union_top_k_blend(p, q, 0.9, 1)
    assert cand.tolist() == [[True, False, False, True]]
    assert int(scores.argmax()) == 3


def test_refusal_and_junk_detector():
    assert is_refusal_or_junk("Step 3: mix it. I'm sorry, I cannot continue")
    assert is_refusal_or_junk("I can\u2019t help with that")
    assert is_refusal_or_junk("and then   ")
    assert is_refusal_or_junk("great \U0001F600")
    assert is_refusal_or_junk("bad \x07 byte")
    assert not is_refusal_or_junk("Knead the dough for ten minutes.\nThen let it rise.")


def test_early_stopper_caps_budget_and_ends_at_sentence():
    cfg = EarlyStopConfig(start=10, end=20, every=2, extra_budget=8)
    stopper = EarlyStopper(cfg, max_new_tokens=100)
    assert not stopper.update(9, "I'm sorry")  # before start: not checked
    assert not stopper.update(11, "I'm sorry")  # not a checkpoint (start + k*every)
    assert not stopper.update(12, "I'm sorry")
    assert stopper.triggered_at == 12 and stopper.budget == 20
    assert not stopper.update(14, "I cannot do that.")  # before half of the extra budget
    assert stopper.update(16, "I cannot do that.")  # past half, at a sentence end
    other = EarlyStopper(cfg, max_new_tokens=100)
    other.update(12, "I'm sorry")
    assert not other.update(19, "and so on")
    assert other.update(20, "and so on")  # the capped budget


def test_configuration_errors_name_field_and_value():
    with pytest.raises(ValidationError, match=r"tau[\s\S]*0\.5"):
        GateConfig(tau=0.5)
    with pytest.raises(ValidationError, match="divergence"):
        GateConfig(divergence="hellinger")
    with pytest.raises(ValidationError, match=r"v_reset=1.5 must be below theta=1.0"):
        GateConfig(v_reset=1.5)
    with pytest.raises(ValidationError, match=r"low_risk=7.0 must not exceed high_risk=6.0"):
        RiskPolicy(low_risk=7)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)
    with pytest.raises(ValidationError, match="empty string"):
        GenerationOptions(stop=("",))
    with pytest.raises(ValidationError, match="extra"):
        GateConfig(threshold=2)
    config = NGSDConfig(gate=GateConfig(tau=4))
    assert NGSDConfig.model_validate(config.model_dump()) == config
