"""``NGSD``: a LlamaIndex ``FunctionCallingLLM`` that generates through the gated decoder.

This module only translates: LlamaIndex messages become neutral chat dicts (``tools.py``
renders tools and tool turns), the core decoder produces token events, and the events become
LlamaIndex responses. Async methods run the decoder in a worker thread and bridge its events
through an ``asyncio.Queue``, so the event loop is never blocked; leaving an async stream early
sets the decoder's ``cancel`` event, which ends the generation within one token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Generator, Mapping, Optional, Sequence, Union

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from ..config import GenerationOptions, NGSDConfig, ToolGuardConfig
from ..decoder import GatedDecoder, Generation, TokenEvent, drain
from ..guard import GuardContext, GuardReview, ToolGuard
from ..registry import get_decoder, get_guard
from ..tools import TOOL_CALL_OPEN, ToolCall, ToolSpec, answer_parts, prepare_messages, tool_call_constraint

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)


class ToolGuardEvent(BaseEvent):
    """Instrumentation event: what the tool-call guard flagged or blocked in one step."""

    review: dict[str, Any]
    """``GuardReview.to_metadata()``: ``blocked``, ``flagged`` and every verdict."""

    @classmethod
    def class_name(cls) -> str:
        return "ToolGuardEvent"

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}
_CALL_KWARGS = frozenset(
    {"max_new_tokens", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "alpha", "tools", "tool_choice", "parallel_tool_calls"}
)


@dataclass
class _Call:
    """Everything one generation needs, resolved from the instance defaults and per-call kwargs."""

    prompt: list[dict[str, Any]]
    options: GenerationOptions
    decode_kwargs: dict[str, Any] = field(default_factory=dict)
    with_tools: bool = False
    guard: Optional[ToolGuard] = None
    guard_context: Optional[GuardContext] = None

    def answer(self, generation: Generation) -> tuple[str, list[ToolCall], Optional[GuardReview]]:
        """The answer's text and the calls that leave the model, after the tool-call guard."""
        content, calls = answer_parts(generation, self.with_tools)
        if self.with_tools:
            content = content.strip()
        if self.guard is None or self.guard_context is None:
            return content, calls, None
        review = self.guard.review(self.guard_context, calls)
        if review.verdicts:
            dispatcher.event(ToolGuardEvent(review=review.to_metadata()))
        return (review.refusal if review.blocked else content), review.calls, review


class NGSD(FunctionCallingLLM):
    """Neuron-gated safe decoding as a LlamaIndex function-calling LLM.

    A base chat model and a small safety expert decode side by side; one neuron decides, token
    by token, when the expert's distribution is blended in. Use it wherever LlamaIndex takes an
    LLM: ``Settings.llm = NGSD()``, query and chat engines, ``FunctionAgent``,
    ``AgentWorkflow``, ``structured_predict``.

    Build it from model ids or paths (``NGSD(base=..., expert=...)``), from an existing
    ``GatedDecoder`` (``NGSD(decoder=...)``), or with no arguments for the embedded
    SmolLM2-135M-Instruct and its default LoRA safety expert. Weights are loaded lazily, on the
    first call, and shared with every other NGSD / LangChain ``ChatNGSD`` instance naming the
    same models (``ngsd_integrations.registry``).

    Per-call keyword arguments (never stored on the instance): ``max_new_tokens`` (alias
    ``max_tokens``), ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``alpha``,
    ``tools``, ``tool_choice``, ``parallel_tool_calls``.
    """

    base: Optional[str] = Field(default=None, description="Base model: hub id, local folder or .gguf path; None is the embedded SmolLM2-135M-Instruct.")
    expert: Optional[str] = Field(default=None, description="Safety expert: LoRA adapter folder or same-vocabulary model; None is the default expert.")
    dtype: str = Field(default="float32", description="Weights dtype: float32, bfloat16, float16 or auto.")
    device: str = Field(default="cpu", description="Torch device of both models.")
    model_name: Optional[str] = Field(default=None, description="Name reported in metadata; default: the base model's id.")
    max_new_tokens: int = Field(default=256, gt=0, description="Default number of new tokens per answer (metadata.num_output).")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling filter; 0 disables it.")
    seed: Optional[int] = Field(default=None, description="Sampling seed; None draws one per call.")
    stop: Optional[list[str]] = Field(default=None, description="Default stop strings (matched on text, across token boundaries).")
    alpha: Optional[float] = Field(default=None, ge=0.0, le=1.0, description="Fixed blend strength; None uses ngsd_config (the risk rating's choice when enabled, else GateConfig.alpha = 0.9).")
    context_window: Optional[int] = Field(default=None, gt=0, description="Override of the context window read from the model config.")
    ngsd_config: Optional[NGSDConfig] = Field(default=None, description="Neuron, risk-rating and early-stop settings of the decoder.")
    tool_guard: ToolGuardConfig = Field(default_factory=ToolGuardConfig, description="Tool-call guard for agents: per-tool allow / flag / block, sensitive tools, tool-result rating (see ToolGuardConfig).")

    _decoder: Optional[GatedDecoder] = PrivateAttr(default=None)
    _decoder_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        base: Optional[Union[str, Path]] = None,
        expert: Optional[Union[str, Path]] = None,
        *,
        decoder: Optional[GatedDecoder] = None,
        callback_manager: Optional[CallbackManager] = None,
        **kwargs: Any,
    ) -> None:
        if decoder is not None and (base is not None or expert is not None):
            raise ValueError("pass either decoder= or base=/expert=, not both")
        if decoder is not None and kwargs.get("ngsd_config") is not None:
            decoder = GatedDecoder(decoder.pair, kwargs["ngsd_config"])
        super().__init__(
            base=str(base) if base is not None else None,
            expert=str(expert) if expert is not None else None,
            callback_manager=callback_manager or CallbackManager([]),
            **kwargs,
        )
        self._decoder = decoder

    @classmethod
    def class_name(cls) -> str:
        return "NGSD"

    # ------------------------------------------------------------------ model access
    @property
    def decoder(self) -> GatedDecoder:
        """The gated decoder, built on first use over the shared (registry) model pair."""
        if self._decoder is None:
            with self._decoder_lock:
                if self._decoder is None:
                    self._decoder = get_decoder(
                        self.base, self.expert, dtype=self.dtype, device=self.device, config=self.ngsd_config
                    )
        return self._decoder

    @property
    def metadata(self) -> LLMMetadata:
        decoder = self.decoder
        name = self.model_name or decoder.pair.base_id or "ngsd"
        if Path(name).is_absolute():
            name = Path(name).name  # a local folder: its name, not the machine's path
        return LLMMetadata(
            context_window=self.context_window or decoder.context_window or 2048,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=name,
        )

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete a prompt; it is rendered with the chat template as one user turn (like ``chat``)
        unless ``formatted=True``, which sends it verbatim."""
        call = self._completion_call(prompt, formatted, kwargs)
        generation = drain(self._iterate(call, None))
        return CompletionResponse(text=generation.text, raw=_raw(generation))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        call = self._completion_call(prompt, formatted, kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            events = self._iterate(call, None)
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    yield CompletionResponse(text=text, delta="", raw=_raw(done.value))
                    return
                if event.text:
                    text += event.text
                    yield CompletionResponse(text=text, delta=event.text, raw=_partial_raw(event))

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        async for item in self._abridge(lambda: self._completion_call(prompt, formatted, kwargs), events=False):
            if isinstance(item, Generation):
                return CompletionResponse(text=item.text, raw=_raw(item))
        raise RuntimeError("the decoder ended without a result")  # pragma: no cover

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for item in self._abridge(lambda: self._completion_call(prompt, formatted, kwargs), events=True):
                if isinstance(item, Generation):
                    yield CompletionResponse(text=text, delta="", raw=_raw(item))
                elif item.text:
                    text += item.text
                    yield CompletionResponse(text=text, delta=item.text, raw=_partial_raw(item))

        return gen()

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._chat_call(messages, kwargs)
        generation = drain(self._iterate(call, None))
        return _chat_response(generation, call)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._chat_call(messages, kwargs)

        def gen() -> ChatResponseGen:
            visible = _VisibleText(call.with_tools)
            events = self._iterate(call, None)
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    yield _final_chunk(done.value, visible, call)
                    return
                delta = visible.push(event.text)
                if delta:
                    yield _text_chunk(visible.emitted, delta, event)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        holder: dict[str, _Call] = {}

        def prepare() -> _Call:
            holder["call"] = self._chat_call(messages, kwargs)
            return holder["call"]

        async for item in self._abridge(prepare, events=False):
            if isinstance(item, Generation):
                return _chat_response(item, holder["call"])
        raise RuntimeError("the decoder ended without a result")  # pragma: no cover

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        holder: dict[str, _Call] = {}

        def prepare() -> _Call:
            holder["call"] = self._chat_call(messages, kwargs)
            return holder["call"]

        async def gen() -> ChatResponseAsyncGen:
            visible: Optional[_VisibleText] = None
            async for item in self._abridge(prepare, events=True):
                if visible is None:
                    visible = _VisibleText(holder["call"].with_tools)
                if isinstance(item, Generation):
                    yield _final_chunk(item, visible, holder["call"])
                    return
                delta = visible.push(item.text)
                if delta:
                    yield _text_chunk(visible.emitted, delta, item)

        return gen()

    # ------------------------------------------------------------------ tools
    def _prepare_chat_with_tools(
        self,
        tools: Sequence["BaseTool"],
        user_msg: Optional[Union[str, ChatMessage]] = None,
        chat_history: Optional[list[ChatMessage]] = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Optional[Union[str, dict[str, Any]]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Messages plus tool specs and the tool choice that ``chat`` turns into a grammar.

        ``tool_required`` (FunctionAgent, ``structured_predict``) forces a call of some tool;
        ``tool_choice`` may be ``auto``, ``none``, ``required``/``any``, a tool name or an
        OpenAI-style ``{"type": "function", "function": {"name": ...}}``.
        """
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
        elif user_msg is not None:
            messages.append(user_msg)
        choice = _tool_choice_name(tool_choice) or ("required" if tool_required else "auto")
        return {
            "messages": messages,
            "tools": [_tool_spec(t) for t in tools] or None,
            "tool_choice": choice,
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence["BaseTool"],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel calls are allowed."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            if len(calls) > 1:
                response.message.blocks = [
                    b for b in response.message.blocks if not isinstance(b, ToolCallBlock) or b is calls[0]
                ]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, but got 0 tool calls; the answer was {response.message.content!r}")
        return [
            ToolSelection(
                tool_id=b.tool_call_id or "",
                tool_name=b.tool_name,
                tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else _loads_dict(b.tool_kwargs),
            )
            for b in calls
        ]

    # ------------------------------------------------------------------ plumbing
    def _options(self, kwargs: Mapping[str, Any]) -> GenerationOptions:
        unknown = set(kwargs) - _CALL_KWARGS
        if unknown:
            logger.debug("NGSD ignores unknown call arguments %s", sorted(unknown))
        max_new = kwargs.get("max_new_tokens", kwargs.get("max_tokens")) or self.max_new_tokens
        stop = kwargs.get("stop", self.stop) or ()
        return GenerationOptions(
            max_new_tokens=max_new,
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            top_k=kwargs.get("top_k", self.top_k),
            seed=kwargs.get("seed", self.seed),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )

    def _decode_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        alpha = kwargs.get("alpha", self.alpha)
        return {"alpha": alpha} if alpha is not None else {}

    def _completion_call(self, prompt: str, formatted: bool, kwargs: Mapping[str, Any]) -> _Call:
        options, extra = self._options(kwargs), self._decode_kwargs(kwargs)
        if formatted:
            return _Call(prompt, options, extra)  # type: ignore[arg-type]  # a raw string is sent verbatim
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        if self.system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        return self._chat_call(messages, {**kwargs, "tools": None})

    def _chat_call(self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]) -> _Call:
        options, extra = self._options(kwargs), self._decode_kwargs(kwargs)
        specs = [_tool_spec(t) for t in kwargs.get("tools") or []]
        choice = _tool_choice_name(kwargs.get("tool_choice")) or "auto"
        if choice == "none":
            specs = []
        if choice in ("required", "any") and len(specs) == 1 and not kwargs.get("parallel_tool_calls", True):
            choice = specs[0].name  # exactly one call: the grammar ends after it instead of allowing more
        decoder = self.decoder
        neutral, template_tools = prepare_messages(_to_neutral(messages), specs or None, decoder.tokenizer, choice)
        if template_tools:
            extra["tools"] = template_tools
        if specs:
            constraint = tool_call_constraint(decoder.tokenizer, decoder.vocab_size, specs, choice)
            if constraint is not None:
                extra["constraint"] = constraint
        # Rate the user's own request, not tool instructions or tool results around it.
        users = [m for m in messages if m.role == MessageRole.USER]
        if users and "alpha" not in extra:
            extra["risk_request"] = _text_of(users[-1])
        call = _Call(neutral, options, extra, with_tools=bool(specs))
        guard = get_guard(decoder, self.tool_guard) if specs else None
        if guard is not None and guard.enabled:
            call.guard, call.guard_context = guard, guard.prepare(_to_neutral(messages))
            if "alpha" not in extra and (tainted_alpha := call.guard.alpha_for(call.guard_context)) is not None:
                extra["alpha"] = tainted_alpha
        return call

    def _iterate(self, call: _Call, cancel: Optional[threading.Event]) -> Generator[TokenEvent, None, Generation]:
        """The decoder's token events for one call; the generator's return value is the Generation."""
        return (yield from self.decoder.stream(call.prompt, call.options, cancel=cancel, **call.decode_kwargs))

    async def _abridge(self, prepare: Any, events: bool) -> AsyncIterator[Union[TokenEvent, Generation]]:
        """Run ``prepare`` and the decoder in a worker thread; yield its events, then its Generation.

        Leaving the iteration early (break, exception, task cancellation, garbage collection)
        sets the decoder's cancel event, so the worker thread stops within one token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancel.set()

        def work() -> None:
            try:
                iterator = self._iterate(prepare(), cancel)
                while True:
                    try:
                        event = next(iterator)
                    except StopIteration as done:
                        put("done", done.value)
                        return
                    if events:
                        put("event", event)
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
                put("error", error)

        threading.Thread(target=work, name="ngsd-llama-index", daemon=True).start()
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise value
                yield value
                if kind == "done":
                    return
        finally:
            cancel.set()


# ---------------------------------------------------------------------- helpers
def _raw(generation: Generation, review: Optional[GuardReview] = None) -> dict[str, Any]:
    """What LlamaIndex token counting reads (``usage``), the safety trace summary, the guard's review."""
    raw = {
        "usage": generation.usage,
        "finish_reason": generation.finish_reason,
        "safety": generation.trace.summary(),
    }
    if review is not None:
        raw["tool_guard"] = review.to_metadata()
    return raw


def _partial_raw(event: TokenEvent) -> dict[str, Any]:
    return {
        "token": {
            "index": event.index,
            "token_id": event.token_id,
            "divergence": round(event.divergence, 4),
            "potential": round(event.potential, 4),
            "spike": event.spike,
            "alpha": event.alpha,
        }
    }


class _VisibleText:
    """Streamed answer text; with tools, text from the tool-call tag on is held back for parsing,
    and so is surrounding whitespace (the final content is stripped)."""

    def __init__(self, with_tools: bool):
        self.with_tools = with_tools
        self.raw = ""
        self.emitted = ""

    def push(self, delta: str) -> str:
        self.raw += delta
        end = len(self.raw)
        if self.with_tools:
            tag = self.raw.find(TOOL_CALL_OPEN)
            if tag >= 0:
                end = tag
            else:  # a tail that may still grow into the tag
                end -= next((k for k in range(min(len(TOOL_CALL_OPEN) - 1, end), 0, -1) if self.raw.endswith(TOOL_CALL_OPEN[:k])), 0)
        candidate = self.raw[:end].strip() if self.with_tools else self.raw[:end]
        new = candidate[len(self.emitted) :] if len(candidate) > len(self.emitted) else ""
        self.emitted += new
        return new


def _message(content: str, calls: list[ToolCall]) -> ChatMessage:
    blocks: list[Any] = [TextBlock(text=content)]
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments)) for c in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


def _chat_response(generation: Generation, call: _Call) -> ChatResponse:
    content, calls, review = call.answer(generation)
    return ChatResponse(message=_message(content, calls), raw=_raw(generation, review))


def _text_chunk(text: str, delta: str, event: TokenEvent) -> ChatResponse:
    return ChatResponse(message=_message(text, []), delta=delta, raw=_partial_raw(event))


def _final_chunk(generation: Generation, visible: _VisibleText, call: _Call) -> ChatResponse:
    """The last chunk: the parsed tool calls (after the guard) and whatever text was still held back."""
    content, calls, review = call.answer(generation)
    refused = generation.finish_reason == "refused" or (review is not None and review.blocked)
    if refused and not content.startswith(visible.emitted):  # the refusal follows the prose streamed so far
        content = f"{visible.emitted} {content}".strip()
    # Joined deltas must equal the final content: only text extending what was streamed is new.
    delta = content[len(visible.emitted) :] if content.startswith(visible.emitted) else ""
    if not content.startswith(visible.emitted):
        content = visible.emitted
    return ChatResponse(message=_message(content, calls), delta=delta, raw=_raw(generation, review))


def _text_of(message: ChatMessage) -> str:
    return "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock))


def _loads_dict(text: Any) -> dict[str, Any]:
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _calls_of(message: ChatMessage) -> list[ToolCall]:
    calls = [
        ToolCall(name=b.tool_name, arguments=_loads_dict(b.tool_kwargs), id=b.tool_call_id or f"call_{i}")
        for i, b in enumerate(message.blocks)
        if isinstance(b, ToolCallBlock)
    ]
    if calls:
        return calls
    # Older integrations keep OpenAI-style dicts or ToolSelections in additional_kwargs.
    for i, raw in enumerate(message.additional_kwargs.get("tool_calls") or []):
        if isinstance(raw, ToolSelection):
            calls.append(ToolCall(name=raw.tool_name, arguments=dict(raw.tool_kwargs), id=raw.tool_id or f"call_{i}"))
        elif isinstance(raw, Mapping):
            fn = raw.get("function") or raw
            calls.append(ToolCall(name=fn.get("name", ""), arguments=_loads_dict(fn.get("arguments")), id=raw.get("id") or f"call_{i}"))
    return calls


def _to_neutral(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as the framework-free dicts ``tools.prepare_messages`` takes."""
    neutral = []
    for message in messages:
        role = _ROLES.get(message.role, "user")
        item: dict[str, Any] = {"role": role, "content": _text_of(message)}
        if role == "assistant":
            calls = _calls_of(message)
            if calls:
                item["tool_calls"] = calls
        if role == "tool":
            extra = message.additional_kwargs
            item["tool_call_id"] = extra.get("tool_call_id") or ""
            if extra.get("name") or extra.get("tool_name"):
                item["name"] = extra.get("name") or extra.get("tool_name")
        neutral.append(item)
    return neutral


def _tool_spec(tool: Any) -> ToolSpec:
    """A LlamaIndex tool, an OpenAI-style spec dict or a ToolSpec, as a ToolSpec."""
    if isinstance(tool, ToolSpec):
        return tool
    if isinstance(tool, Mapping):
        fn = tool.get("function", tool)
        return ToolSpec(name=fn["name"], description=fn.get("description", ""), parameters=fn.get("parameters") or {})
    fn = tool.metadata.to_openai_tool(skip_length_check=True)["function"]
    return ToolSpec(name=fn["name"], description=fn.get("description") or "", parameters=fn["parameters"])


def _tool_choice_name(choice: Any) -> Optional[str]:
    if choice is None:
        return None
    if isinstance(choice, Mapping):
        return (choice.get("function") or {}).get("name") or choice.get("name") or choice.get("type")
    return str(choice)
