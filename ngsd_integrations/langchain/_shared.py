"""What ChatNGSD and NGSDLLM share: the decoder registry, requests, the async bridge, messages.

Weights load lazily, on the first generation, and once per process for a given
(base, expert, dtype, device) through ``ngsd_integrations.registry`` (shared with the LlamaIndex
adapter): ten model objects over the same models share one decoder.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

from ..config import GenerationOptions, NGSDConfig
from ..decoder import GatedDecoder, Generation, TokenEvent
from ..early_stop import contains_refusal
from ..guard import GuardContext, GuardReview, ToolGuard
from ..models import EMBEDDED_BASE_NAME
from ..tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, parse_tool_calls

PROVIDER = "ngsd"
"""``ls_provider`` and ``response_metadata["model_provider"]`` of every message we produce."""

# ---------------------------------------------------------------- shared weights
def shared_decoder(model: str, expert: str | None, config: NGSDConfig, dtype: str, device: str) -> GatedDecoder:
    """The process-wide decoder for these models and this configuration (loaded on first use).

    Goes through ``ngsd_integrations.registry``, shared with the LlamaIndex adapter: one copy
    of the weights per process, one decoder (and risk-rater prefix) per configuration.
    """
    from .. import registry

    base = None if model == EMBEDDED_BASE_NAME else model
    return registry.get_decoder(base, expert, dtype=dtype, device=device, config=config)


class NGSDFields(BaseModel):
    """The fields, validation and constructors ``ChatNGSD`` and ``NGSDLLM`` have in common."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str = Field(default=EMBEDDED_BASE_NAME, alias="model_name")
    """Base model: hub id, local folder or ``.gguf`` path (default: the embedded SmolLM2-135M-Instruct)."""
    expert: str | None = None
    """Safety expert: peft LoRA folder of the base or a same-vocabulary model (default: the embedded expert)."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature; 0 is greedy decoding."""
    max_tokens: int | None = Field(default=256, ge=1)
    """Most new tokens per answer (None: 256)."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds a call may take; past it the generation is cancelled and ``TimeoutError`` raised."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop strings, matched on the decoded text (they may span token boundaries)."""
    max_retries: int = Field(default=2, ge=0)
    """Accepted for drop-in compatibility; a local model has no transient failures to retry."""
    streaming: bool = False
    """Route ``invoke`` through the streaming path (per-token callbacks)."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (only with temperature > 0)."""
    top_k: int = Field(default=0, ge=0)
    """Top-k sampling filter, 0 = off (only with temperature > 0)."""
    seed: int | None = None
    """Sampling seed for reproducible sampled answers."""
    alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    """Fixed blend strength on a spike (0 = base only, 1 = expert only); None: ``ngsd_config``'s
    (the risk rating's choice when it is enabled, else ``GateConfig.alpha`` = 0.9)."""
    ngsd_config: NGSDConfig = Field(default_factory=NGSDConfig)
    """Neuron, risk-rating and early-stop settings (see ``ngsd_integrations.NGSDConfig``)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights dtype when loading models."""
    device: str = "cpu"
    """Torch device when loading models."""
    decoder: Any = Field(default=None, exclude=True)
    """An existing ``GatedDecoder`` to use instead of loading ``model`` / ``expert``."""

    @model_validator(mode="after")
    def _check_decoder(self) -> Self:
        if self.decoder is not None and not isinstance(self.decoder, GatedDecoder):
            raise ValueError(f"decoder={self.decoder!r} must be a GatedDecoder")
        return self

    @classmethod
    def from_model_id(cls, base: str, expert: str | None = None, **kwargs: Any) -> Self:
        """A model over ``base`` guarded by ``expert`` (loaded lazily, shared across instances)."""
        return cls(model=str(base), expert=None if expert is None else str(expert), **kwargs)

    @classmethod
    def from_decoder(cls, decoder: GatedDecoder, **kwargs: Any) -> Self:
        """A model over an existing decoder (its weights, configuration and lock)."""
        kwargs.setdefault("model", decoder.pair.base_id or EMBEDDED_BASE_NAME)
        kwargs.setdefault("expert", decoder.pair.expert_id or None)
        return cls(decoder=decoder, **kwargs)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "expert": self.expert,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "alpha": self.alpha,
            "ngsd_config": self.ngsd_config.model_dump(),
        }

    def _fill_ls_params(self, params: dict[str, Any], model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> Any:
        """LangSmith parameters of a call: provider, model, sampling settings, stop strings."""
        params["ls_provider"] = PROVIDER
        params["ls_model_name"] = kwargs.get("model") or self.model
        params["ls_model_type"] = model_type
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if ls_stop := stop or kwargs.get("stop") or self.stop:
            params["ls_stop"] = list(ls_stop)
        return params

    def get_decoder(self, model: str | None = None) -> GatedDecoder:
        """The decoder this model generates with (loading the weights on first use)."""
        if self.decoder is not None and (model is None or model == self.model):
            return self.decoder
        return shared_decoder(model or self.model, self.expert, self.ngsd_config, self.dtype, self.device)


# ---------------------------------------------------------------- one request
@dataclass
class Request:
    """Everything one generation needs, resolved from fields and per-call keyword arguments."""

    prompt: Any
    options: GenerationOptions
    decode_kwargs: dict[str, Any] = field(default_factory=dict)
    parse_tools: bool = False
    timeout: float | None = None
    guard: ToolGuard | None = None
    """The tool-call guard reviewing this step's calls (None: tools not bound or guard off)."""
    guard_context: GuardContext | None = None

    def review(self, calls: list[ToolCall]) -> GuardReview | None:
        """The guard's decision on the calls the model made (None without a guard)."""
        if self.guard is None or self.guard_context is None:
            return None
        return self.guard.review(self.guard_context, calls)


def stream_generation(decoder: GatedDecoder, request: Request, cancel: threading.Event) -> Iterator[TokenEvent]:
    """Stream one generation's events; the generator's return value is the finished ``Generation``.

    ``GatedDecoder.stream`` yields events only, and the trace (risk scores, prompt tokens) is
    needed for the response metadata, so the run is driven here the way ``stream`` drives it.
    """
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        cancel.set()

    timer = threading.Timer(request.timeout, expire) if request.timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        result: Generation = yield from decoder.stream(
            request.prompt, request.options, cancel=cancel, **request.decode_kwargs
        )
    finally:
        if timer is not None:
            timer.cancel()
    if result.finish_reason == "cancelled" and timed_out.is_set():
        raise TimeoutError(f"generation exceeded timeout={request.timeout} s")
    return result


_DONE = object()


async def astream_generation(
    decoder: GatedDecoder, request: Request, cancel: threading.Event | None = None
) -> AsyncIterator[TokenEvent | Generation]:
    """Async twin of :func:`stream_generation`: yields events, then the ``Generation``.

    The decoder runs in a worker thread and hands events over through a queue, so the event
    loop never blocks; closing or cancelling this iterator sets ``cancel``, which ends the
    generation within one token.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = cancel or threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed under us; the consumer is gone
            cancel.set()

    def work() -> None:
        events = stream_generation(decoder, request, cancel)
        try:
            while True:
                put(next(events))
        except StopIteration as stop:
            put(stop.value)
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            put(error)
            put(_DONE)

    worker = threading.Thread(target=work, name="ngsd-generation", daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()  # no-op when finished; stops the worker within one token when abandoned


# ---------------------------------------------------------------- tool-call guard
GUARD_EVENT = "ngsd_tool_guard"
"""Name of the custom callback event carrying a step's guard review (``on_custom_event``)."""


def dispatch_guard_event(run_manager: Any, review: GuardReview | None) -> None:
    """Tell the run's callback handlers what the guard flagged or blocked."""
    if run_manager is None or review is None or not review.verdicts:
        return
    from langchain_core.callbacks.manager import handle_event

    handle_event(
        run_manager.handlers, "on_custom_event", "ignore_custom_event", GUARD_EVENT, review.to_metadata(),
        run_id=run_manager.run_id, tags=run_manager.tags, metadata=run_manager.metadata,
    )


async def adispatch_guard_event(run_manager: Any, review: GuardReview | None) -> None:
    """Async twin of :func:`dispatch_guard_event`."""
    if run_manager is None or review is None or not review.verdicts:
        return
    from langchain_core.callbacks.manager import ahandle_event

    await ahandle_event(
        run_manager.handlers, "on_custom_event", "ignore_custom_event", GUARD_EVENT, review.to_metadata(),
        run_id=run_manager.run_id, tags=run_manager.tags, metadata=run_manager.metadata,
    )


# ---------------------------------------------------------------- results
def looks_refused(generation: Generation) -> bool:
    """A refusal the gate produced: the expert was blended in and the prose answer opens as a refusal.

    Tool calls and structured output are grammar-bound JSON, never a refusal: whatever the blend
    wrote into their string fields, the caller gets the object it asked for (the trace still
    shows the spikes).
    """
    if generation.finish_reason in ("early_stop", "refused"):
        return True
    if not generation.trace.spike_count:
        return False
    prose, calls = parse_tool_calls(generation.text)
    if calls or prose.lstrip().startswith(("{", "[")):
        return False
    return contains_refusal(prose[:300])


def generation_metadata(generation: Generation, model_name: str) -> dict[str, Any]:
    """``response_metadata`` of one answer: model, finish reason, safety trace summary."""
    summary = generation.trace.summary()
    return {
        "model_name": model_name,
        "model_provider": PROVIDER,
        "finish_reason": generation.finish_reason,
        "safety": summary,
        "refused": looks_refused(generation),
    }


def usage_metadata(generation: Generation) -> dict[str, int]:
    usage = generation.usage
    return {
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
    }


class ToolCallSplitter:
    """Splits streamed text into prose and complete tool calls as the deltas arrive.

    Text that may be the start of ``<tool_call>`` is held back until it is decided; a call is
    released as soon as its ``</tool_call>`` arrives. Whitespace between calls is dropped, as
    :func:`parse_tool_calls` drops it from a whole answer.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.pending_space = ""
        self.calls = 0

    def feed(self, delta: str, final: bool = False) -> list[str | ToolCall]:
        self.buffer += delta
        out: list[str | ToolCall] = []
        while self.buffer:
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.buffer, TOOL_CALL_OPEN)
                self._text(self.buffer[: len(self.buffer) - keep], out)
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            if start > 0:
                self._text(self.buffer[:start], out)
                self.buffer = self.buffer[start:]
            end = self.buffer.find(TOOL_CALL_CLOSE)
            if end < 0:
                if final:
                    self.buffer = ""  # cut off by the token budget: never a valid call
                break
            block, self.buffer = self.buffer[: end + len(TOOL_CALL_CLOSE)], self.buffer[end + len(TOOL_CALL_CLOSE) :]
            _, calls = parse_tool_calls(block)
            if calls:
                self.pending_space = ""
                self.calls += 1
                out.extend(calls)
            else:
                self._text(block, out)
        if final and self.pending_space and not self.calls:
            out.append(self.pending_space)
            self.pending_space = ""
        return out

    def _text(self, text: str, out: list[str | ToolCall]) -> None:
        if not text:
            return
        if not text.strip():
            self.pending_space += text
            return
        if self.calls and not out and not self.pending_space:
            text = text.lstrip()
        out.append(self.pending_space + text if not self.calls else text)
        self.pending_space = ""


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


# ---------------------------------------------------------------- tool choice
def normalize_tool_choice(tool_choice: Any, tool_names: Sequence[str]) -> str:
    """LangChain / OpenAI / Anthropic tool_choice forms -> ``auto`` | ``required`` | ``none`` | a name."""
    if tool_choice is None or tool_choice == "auto":
        return "auto" if tool_names else "none"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if isinstance(tool_choice, Mapping):
        kind = tool_choice.get("type")
        if kind in ("any", "required"):
            return "required"
        if kind in ("auto", "none"):
            return kind
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if name:
            tool_choice = name
    if isinstance(tool_choice, str) and tool_choice in tool_names:
        return tool_choice
    raise ValueError(f"tool_choice={tool_choice!r} is not auto, any, required, none or one of {list(tool_names)}")


def schema_instruction(schema: Mapping[str, Any]) -> str:
    """System-prompt text asking for JSON that matches ``schema`` (the grammar enforces it)."""
    return (
        "Answer only with a JSON object that matches this JSON schema, filling every field with "
        f"real content:\n{json.dumps(dict(schema), ensure_ascii=False)}"
    )
