"""SafetyTrace: what the neuron saw and did, token by token, for one generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .risk import RiskAssessment


@dataclass
class SafetyTrace:
    """Per-token divergence, membrane potential, spikes and the chosen tokens of one answer."""

    alpha: float
    risk: RiskAssessment | None = None
    token_ids: list[int] = field(default_factory=list)
    divergence: list[float] = field(default_factory=list)
    potential: list[float] = field(default_factory=list)
    spikes: list[bool] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    risk_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def record(self, token_id: int, divergence: float, potential: float, spike: bool) -> None:
        self.token_ids.append(token_id)
        self.divergence.append(divergence)
        self.potential.append(potential)
        self.spikes.append(spike)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def spike_count(self) -> int:
        return sum(self.spikes)

    @property
    def spike_rate(self) -> float:
        return self.spike_count / self.tokens if self.tokens else 0.0

    @property
    def first_spike(self) -> int | None:
        """Index of the first output token chosen on a spike, or None if the neuron stayed silent."""
        return self.spikes.index(True) if any(self.spikes) else None

    def summary(self) -> dict[str, Any]:
        """A flat, JSON-serialisable summary (what adapters put into response metadata)."""
        decode = self.decode_seconds
        return {
            "tokens": self.tokens,
            "spikes": self.spike_count,
            "spike_rate": round(self.spike_rate, 4),
            "first_spike": self.first_spike,
            "alpha": self.alpha,
            "risk": self.risk.risk if self.risk else None,
            "risk_scores": (
                {k: getattr(self.risk, k) for k in ("severity", "actionability", "evasion", "targeting")}
                if self.risk
                else None
            ),
            "mean_divergence": round(sum(self.divergence) / self.tokens, 4) if self.tokens else 0.0,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "risk_seconds": round(self.risk_seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(decode, 4),
            "tokens_per_second": round(self.tokens / decode, 3) if decode > 0 else None,
        }
