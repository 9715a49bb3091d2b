"""Tool-call guard: every call an agent's model makes, and every tool result it reads, is rated.

The calls themselves are generated through the gated decoder like any other text; the guard
adds a second look at the finished call, before it leaves the model. It rates the call (the
request that led to it, the tool's name and its arguments) with the decoder's risk rater and
applies the tool's action from :class:`~ngsd_integrations.config.ToolGuardConfig`. Tool results
of the current step are rated before decoding, so an instruction injected into a page or a
tool output raises the blend strength and makes every call of that step face the stricter
threshold. Framework-free: the LangChain and LlamaIndex adapters call :meth:`ToolGuard.prepare`
before decoding and :meth:`ToolGuard.review` on the calls the model made.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from .config import ToolGuardConfig
from .risk import AXES, RiskAssessment
from .tools import ToolCall

if TYPE_CHECKING:
    from .decoder import GatedDecoder

__all__ = ["GuardReview", "GuardVerdict", "ToolGuard", "describe_tool_call", "describe_tool_result"]

MAX_RESULT_CHARS = 1500


def describe_tool_call(name: str, arguments: Mapping[str, Any], request: str) -> str:
    """The text the rater sees for a call: the request that led to it, then the call itself."""
    args = json.dumps(dict(arguments), ensure_ascii=False)
    return f"User request: {request.strip()}\nThe assistant calls the tool {name} with arguments {args}"


def describe_tool_result(name: str, content: str) -> str:
    """The text the rater sees for a tool's result (long results keep their head and tail)."""
    content = content.strip()
    if len(content) > MAX_RESULT_CHARS:
        half = MAX_RESULT_CHARS // 2
        content = content[:half] + "\n[...]\n" + content[-half:]
    return f"Content returned by the tool {name}:\n{content}"


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's judgement of one tool call or one tool result."""

    kind: Literal["tool_call", "tool_result"]
    name: str
    """The tool's name."""
    risk: float
    """Combined risk 0-10 from the rating (0 for an ``allow`` tool, which is not rated)."""
    threshold: float
    risky: bool
    """``risk > threshold``."""
    action: Literal["allow", "flag", "block"]
    """The tool's action (tool results: ``flag``)."""
    call_id: str | None = None
    arguments: dict[str, Any] | None = None
    """A call's arguments, so a flagged or blocked call can be inspected."""
    scores: dict[str, int] = field(default_factory=dict)
    """The four axis scores of the rating."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GuardReview:
    """What the guard decided for one step: the calls that go out, or the refusal replacing them."""

    calls: list[ToolCall]
    """The calls that leave the model (empty when the step is blocked)."""
    verdicts: list[GuardVerdict]
    """Tool results of the step first, then the calls, in order."""
    refusal: str | None = None
    """Set when a call was blocked: the model's answer instead of its calls."""

    @property
    def blocked(self) -> bool:
        return self.refusal is not None

    @property
    def flagged(self) -> list[GuardVerdict]:
        return [v for v in self.verdicts if v.risky]

    def to_metadata(self) -> dict[str, Any]:
        """JSON-ready summary for message metadata and callbacks."""
        return {
            "blocked": self.blocked,
            "flagged": [v.name for v in self.flagged],
            "verdicts": [v.to_dict() for v in self.verdicts],
        }


@dataclass(frozen=True)
class GuardContext:
    """What the guard learnt before decoding a step: its request and its rated tool results."""

    request: str
    results: list[GuardVerdict]

    @property
    def tainted(self) -> bool:
        """A tool result of this step looks like an injection."""
        return any(v.risky for v in self.results)


class ToolGuard:
    """Rates tool calls and tool results with a decoder's risk rater and applies the policy.

    Holds no state of any one agent run: ``prepare`` returns the step's context and ``review``
    takes it back, so one guard serves concurrent runs. Ratings are cached by text (a rating is
    deterministic), so a result re-read at every step of a long agent loop is rated once.
    """

    def __init__(self, decoder: "GatedDecoder", config: ToolGuardConfig | None = None, cache_size: int = 256):
        self.decoder = decoder
        self.config = config or ToolGuardConfig()
        self._cache: OrderedDict[str, RiskAssessment] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """``ToolGuardConfig.enabled``, with ``auto`` meaning: when the decoder rates risk."""
        enabled = self.config.enabled
        return self.decoder.risk_enabled if enabled == "auto" else bool(enabled)

    def rate(self, text: str) -> RiskAssessment:
        """The rater's assessment of ``text`` (cached)."""
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        assessment = self.decoder.rate(text)
        with self._lock:
            self._cache[text] = assessment
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return assessment

    def prepare(self, messages: Sequence[Mapping[str, Any]]) -> GuardContext:
        """Rate the tool results of the current step (those after the last user message).

        ``messages`` are neutral chat messages (``role``, ``content``, ``name`` for tools).
        """
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        request = str(messages[last_user].get("content") or "") if last_user >= 0 else ""
        results: list[GuardVerdict] = []
        if self.enabled and self.config.rate_tool_results:
            for message in messages[last_user + 1 :]:
                if message.get("role") != "tool":
                    continue
                name = str(message.get("name") or "tool")
                rating = self.rate(describe_tool_result(name, str(message.get("content") or "")))
                results.append(self._verdict("tool_result", name, rating, self.config.result_threshold, "flag"))
        return GuardContext(request, results)

    def alpha_for(self, context: GuardContext) -> float | None:
        """The blend strength a tainted step decodes with (None: the decoder's usual choice)."""
        return self.decoder.config.risk.high_alpha if context.tainted else None

    def review(self, context: GuardContext, calls: Sequence[ToolCall]) -> GuardReview:
        """Judge the calls the model made in this step; block them all if any blocked call is risky."""
        verdicts = list(context.results)
        if not self.enabled or not calls:
            return GuardReview(list(calls), verdicts)
        blocked = False
        for call in calls:
            action = self.config.actions.get(call.name, self.config.default_action)
            strict = call.name in self.config.sensitive_tools or context.tainted
            threshold = self.config.sensitive_threshold if strict else self.config.threshold
            if action == "allow":
                verdicts.append(GuardVerdict("tool_call", call.name, 0.0, threshold, False, action, call.id, call.arguments))
                continue
            rating = self.rate(describe_tool_call(call.name, call.arguments, context.request))
            verdict = self._verdict("tool_call", call.name, rating, threshold, action, call)
            verdicts.append(verdict)
            blocked = blocked or (verdict.risky and action == "block")
        if blocked:
            return GuardReview([], verdicts, self.config.refusal)
        return GuardReview(list(calls), verdicts)

    @staticmethod
    def _verdict(
        kind: Literal["tool_call", "tool_result"], name: str, rating: RiskAssessment, threshold: float,
        action: Literal["allow", "flag", "block"], call: ToolCall | None = None,
    ) -> GuardVerdict:
        scores = {axis: getattr(rating, axis) for axis in AXES}
        return GuardVerdict(
            kind, name, rating.risk, threshold, rating.risk > threshold, action,
            call.id if call else None, dict(call.arguments) if call else None, scores,
        )
