"""The single leaky integrate-and-fire (LIF) neuron that switches the expert's guidance on.

A ``LIFGate`` holds the membrane potential of one generation (one value per batch row); it is
created for each generation and never shared, so concurrent generations cannot disturb it.
"""

from __future__ import annotations

import torch

from .config import GateConfig


class LIFGate:
    """Integrates per-token divergence and spikes when the potential reaches the threshold.

    ``v <- (1 - 1/tau) * v + D``; on ``v >= theta`` it spikes and is softly reset to
    ``v_reset + rho * (v - v_reset)``. Mode ``always`` spikes on every token and ``never`` on
    none; both still integrate, so traces show what the neuron would have done.
    """

    def __init__(self, config: GateConfig, batch_size: int, initial_potential: torch.Tensor | None = None):
        self.config = config
        self.leak = 1.0 - 1.0 / config.tau
        if initial_potential is None:
            initial_potential = torch.full((batch_size,), config.v_reset)
        self.potential = initial_potential.to(torch.float32).clone()

    def step(self, divergence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one divergence per row; return (spike mask, potential compared with theta)."""
        cfg = self.config
        integrated = self.leak * self.potential + divergence.to(torch.float32)
        if cfg.mode == "lif":
            spike = integrated >= cfg.theta
        else:
            spike = torch.full_like(integrated, cfg.mode == "always", dtype=torch.bool)
        fired = integrated >= cfg.theta
        soft_reset = cfg.v_reset + cfg.rho * (integrated - cfg.v_reset)
        self.potential = torch.where(fired, soft_reset, integrated)
        return spike, integrated
