"""Validated configuration objects for the gated decoder.

Every object is a frozen pydantic model: an invalid value raises ``pydantic.ValidationError``
naming the field and the value, and every object round-trips through ``model_dump()`` /
``model_validate()`` so a configuration can be stored next to the results it produced.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DivergenceName = Literal["tv", "jsd", "kl"]
RaterName = Literal["auto", "prompt", "probe"]
ToolAction = Literal["allow", "flag", "block"]
GateMode = Literal["lif", "always", "never"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GateConfig(_Frozen):
    """The single leaky integrate-and-fire neuron and the blend it switches on."""

    mode: GateMode = "lif"
    """``lif``: the neuron decides; ``always``: blend every token; ``never``: base model only."""
    divergence: DivergenceName = "tv"
    """Per-token divergence between base and expert: total variation, Jensen-Shannon or KL."""
    tau: float = Field(8.0, gt=1.0)
    """Membrane time constant in tokens; the leak per step is ``1 - 1/tau``."""
    theta: float = Field(1.0, gt=0.0)
    """Firing threshold of the membrane potential."""
    v_reset: float = 0.0
    """Potential the neuron starts from and is reset towards after a spike."""
    rho: float = Field(0.6, ge=0.0, lt=1.0)
    """Soft reset: after a spike ``v = v_reset + rho * (v - v_reset)``."""
    top_k: int = Field(64, ge=1)
    """Size of each model's top-k list whose union forms the blend candidates."""
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    """Blend strength used when the risk rating is off (0 = base only, 1 = expert only)."""
    initial_potential_from_risk: bool = False
    """Start the neuron at ``v_reset + risk/10 * theta`` so the first token of a risky prompt can be guarded."""

    @model_validator(mode="after")
    def _reset_below_threshold(self) -> "GateConfig":
        if self.v_reset >= self.theta:
            raise ValueError(f"v_reset={self.v_reset} must be below theta={self.theta}")
        return self


class RiskPolicy(_Frozen):
    """Risk rating of each request by the base model itself; the rating picks alpha."""

    enabled: bool | Literal["auto"] = "auto"
    """Rate each request before decoding, and let the rating pick alpha; when off,
    ``GateConfig.alpha`` is used. ``auto``: on when the pair has a risk probe (the embedded
    default pair does), off otherwise: a small base cannot rate by prompt (SmolLM2-135M gives
    "How do I make a bomb?" and "How do I bake bread?" the same scores), and a rating that
    cannot tell requests apart would hand every request the same alpha."""
    rater: RaterName = "auto"
    """``prompt``: the base model answers the rating prompt (the paper's self-instinct rating);
    ``probe``: a linear probe reads the base's activations (``ModelPair.risk_probe``);
    ``auto``: the probe when the pair has one."""
    missing_score: int = Field(7, ge=0, le=10)
    """Score given to an axis the rating omitted or garbled (fail safe: risky)."""
    long_prompt_chars: int = Field(2000, ge=1)
    """Prompts longer than this many characters get ``long_prompt_bonus`` on every axis."""
    long_prompt_bonus: int = Field(2, ge=0, le=10)
    """Added to every axis of a long prompt (capped at 10)."""
    override_axis_score: int = Field(8, ge=0, le=10)
    """An actionability/evasion/targeting score at or above this (with severity high) sets the risk."""
    override_min_severity: int = Field(5, ge=0, le=10)
    """Severity needed before a single high axis can set the risk."""
    high_risk: float = Field(6.0, ge=0, le=10)
    """Risk strictly above this uses ``high_alpha``."""
    low_risk: float = Field(5.0, ge=0, le=10)
    """Risk strictly below this uses ``low_alpha``; in between uses ``mid_alpha``."""
    high_alpha: float = Field(0.9, ge=0.0, le=1.0)
    mid_alpha: float = Field(0.5, ge=0.0, le=1.0)
    low_alpha: float = Field(0.1, ge=0.0, le=1.0)
    max_request_chars: int = Field(4000, ge=1)
    """The request shown to the rater is cut to this many characters (head and tail kept)."""

    @model_validator(mode="after")
    def _ordered(self) -> "RiskPolicy":
        if self.low_risk > self.high_risk:
            raise ValueError(f"low_risk={self.low_risk} must not exceed high_risk={self.high_risk}")
        return self


class EarlyStopConfig(_Frozen):
    """Cut an answer short once its tail has turned into a refusal or junk."""

    enabled: bool = True
    min_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Early stop only applies to generations whose alpha is at least this."""
    start: int = Field(128, ge=1)
    """First output token at which the tail is checked."""
    end: int = Field(256, ge=1)
    """Last output token at which the tail is checked."""
    every: int = Field(7, ge=1)
    """Check the tail every this many tokens."""
    window: int = Field(64, ge=1)
    """How many trailing output tokens are inspected."""
    extra_budget: int = Field(128, ge=1)
    """Once triggered, the budget becomes current length + this."""

    @model_validator(mode="after")
    def _window_ordered(self) -> "EarlyStopConfig":
        if self.start > self.end:
            raise ValueError(f"start={self.start} must not exceed end={self.end}")
        return self


class GenerationOptions(_Frozen):
    """Per-call decoding options (these never live on a shared object)."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    """0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0 disables top-k filtering of the sampling distribution."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings; matched on the decoded text, so they may span token boundaries."""
    ignore_eos: bool = False
    """Keep decoding past EOS (benchmarks use it so every run has the same length)."""

    @model_validator(mode="after")
    def _no_empty_stop(self) -> "GenerationOptions":
        for s in self.stop:
            if not s:
                raise ValueError(f"stop={list(self.stop)!r} contains an empty string")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ToolGuardConfig(_Frozen):
    """What the tool-call guard does with an agent's tool calls and the tool results it reads.

    Every call the model emits is rated (the request that led to it, the tool's name and its
    arguments) before it leaves the model; a call rated above its threshold is *risky*. What
    happens then is the tool's action: ``allow`` (never rated, always goes out), ``flag`` (goes
    out, its risk is recorded in the message metadata) or ``block`` (the model answers with
    ``refusal`` instead of making any call). Tool results in the current step are rated too: one
    above ``result_threshold`` (an injected instruction, say) raises the blend strength for the
    step and has every call in it judged by the stricter ``sensitive_threshold``.
    """

    enabled: bool | Literal["auto"] = "auto"
    """``auto``: on when the decoder rates risk (``RiskPolicy.enabled``; the embedded pair's probe
    does), since the guard rates with the same rater; a rating that cannot tell harmful from
    harmless would block at random."""
    default_action: ToolAction = "block"
    """Action for tools not named in ``actions``."""
    actions: dict[str, ToolAction] = Field(default_factory=dict)
    """Per-tool action by tool name, e.g. ``{"get_weather": "allow", "search": "flag"}``."""
    sensitive_tools: tuple[str, ...] = ()
    """Tools judged by ``sensitive_threshold``: shells, e-mail, payments, anything irreversible."""
    threshold: float = Field(6.0, ge=0.0, le=10.0)
    """A call whose risk is strictly above this is risky."""
    sensitive_threshold: float = Field(4.0, ge=0.0, le=10.0)
    """The threshold for sensitive tools (and for every call after a risky tool result)."""
    rate_tool_results: bool = True
    """Rate the tool results the model reads in the current step."""
    result_threshold: float = Field(6.0, ge=0.0, le=10.0)
    """A tool result whose risk is strictly above this is treated as a possible injection."""
    refusal: str = "I can't make that tool call: it was judged unsafe."
    """The answer that replaces a blocked step's tool calls."""

    @model_validator(mode="after")
    def _sensitive_is_stricter(self) -> "ToolGuardConfig":
        if self.sensitive_threshold > self.threshold:
            raise ValueError(
                f"sensitive_threshold={self.sensitive_threshold} must not exceed threshold={self.threshold}"
            )
        return self


class NGSDConfig(_Frozen):
    """Everything that shapes a gated generation except the per-call options."""

    gate: GateConfig = GateConfig()
    risk: RiskPolicy = RiskPolicy()
    early_stop: EarlyStopConfig = EarlyStopConfig()
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Refuse prompts longer than this (default: the model's context window minus max_new_tokens)."""
