"""ChatNGSD: a LangChain chat model that generates through the gated decoder."""

from __future__ import annotations

import asyncio
import json
import threading
from operator import itemgetter
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Mapping, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.block_translators import register_translator
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from pydantic import Field

from .. import registry
from ..config import GenerationOptions, ToolGuardConfig
from ..decoder import GatedDecoder, Generation, drain
from ..guard import GuardReview
from ..tools import (
    ToolCall,
    ToolSpec,
    answer_parts,
    prepare_messages,
    structured_output_constraint,
    tool_call_constraint,
)
from ._shared import (
    PROVIDER,
    NGSDFields,
    Request,
    ToolCallSplitter,
    adispatch_guard_event,
    astream_generation,
    dispatch_guard_event,
    generation_metadata,
    normalize_tool_choice,
    schema_instruction,
    stream_generation,
    usage_metadata,
)

__all__ = ["ChatNGSD"]


class ChatNGSD(NGSDFields, BaseChatModel):
    """Chat model whose every token is guarded by neuron-gated safe decoding (NGSD).

    A base model and a small safety expert decode side by side; one leaky integrate-and-fire
    neuron decides, token by token, when the expert's distribution is blended in. Works wherever
    a LangChain chat model does: LCEL chains, ``create_agent``, LangGraph graphs.

    Setup:
        ``pip install "ngsd-integrations[langchain]"``. With no arguments the embedded
        SmolLM2-135M-Instruct and its default LoRA safety expert are used (no network).

    Instantiate:
        .. code-block:: python

            from ngsd_integrations.langchain import ChatNGSD

            llm = ChatNGSD()                                    # embedded default pair
            llm = ChatNGSD.from_model_id("Qwen/Qwen2.5-1.5B-Instruct", "path/to/expert-lora")
            llm = ChatNGSD.from_decoder(my_gated_decoder, max_tokens=64)

    Weights load on the first call and are shared by every instance over the same models.

    Invoke / stream / tools / structured output:
        .. code-block:: python

            llm.invoke("What is the capital of France?").content
            for chunk in llm.stream("Tell me a joke"): print(chunk.content, end="")
            llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?").tool_calls
            llm.with_structured_output(Joke).invoke("Tell me a joke about cats")

    Safety metadata:
        ``response_metadata["safety"]`` holds the trace summary (risk scores, alpha, spikes,
        spike rate); a refusal the gate produced adds a ``refusal`` content block to
        ``content_blocks`` while ``content`` keeps the plain text.

    Tool-call guard (agents):
        with tools bound, every call is rated before it leaves the model and the tool results
        of the step are rated before decoding (``tool_guard``, a ``ToolGuardConfig``). A blocked
        step answers with a refusal and no calls; the review is in
        ``response_metadata["tool_guard"]`` and reaches callbacks as the custom event
        ``ngsd_tool_guard``.
    """

    tool_guard: ToolGuardConfig = Field(default_factory=ToolGuardConfig)
    """Policy for agents' tool calls and tool results: per-tool allow / flag / block, sensitive tools."""

    # ---------------------------------------------------------------- LangChain identity
    @property
    def _llm_type(self) -> str:
        return "ngsd-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._fill_ls_params(super()._get_ls_params(stop=stop, **kwargs), "chat", stop, kwargs)

    # ---------------------------------------------------------------- tools and structure
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; calls are parsed into ``AIMessage.tool_calls``.

        ``tool_choice``: ``auto`` (default; the model decides, and any call it opens is
        grammar-constrained to the tool's schema), ``any`` / ``required`` (one call, forced),
        a tool name (that tool, forced) or ``none``. Arguments are always valid JSON for the
        tool's schema.
        """
        # The grammar is always strict; calls are one per block however many the model writes.
        kwargs.pop("strict", None)
        kwargs.pop("parallel_tool_calls", None)
        if "ls_structured_output_format" in kwargs:  # with_structured_output: filling a schema is not an action
            kwargs["structured_output"] = True
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        normalize_tool_choice(tool_choice, names)  # fail at bind time, not at call time
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Answers parsed into ``schema`` (pydantic class, TypedDict, JSON schema or OpenAI tool).

        Every method constrains the decoder with a grammar, so the JSON always parses and
        matches the schema: ``function_calling`` forces a call of a tool named after the
        schema; ``json_schema`` and ``json_mode`` constrain the whole answer to the schema.
        """
        del strict  # the grammar is always strict
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw)
        if method not in ("json_schema", "json_mode"):
            raise ValueError(f"method={method!r} must be function_calling, json_schema or json_mode")
        pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
        # json_mode only promises JSON; holding it to the schema it was given is stricter and still JSON.
        json_schema = convert_to_json_schema(schema) if schema else {"type": "object"}
        llm = self.bind(
            response_format=json_schema,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser: Runnable = PydanticOutputParser(pydantic_object=schema) if pydantic_schema else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")

    # ---------------------------------------------------------------- requests
    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[GatedDecoder, Request]:
        kwargs = dict(kwargs)
        kwargs.pop("ls_structured_output_format", None)
        structured = kwargs.pop("structured_output", False)  # set by bind_tools for with_structured_output
        decoder = self.get_decoder(kwargs.pop("model", None))
        tools = [ToolSpec.from_openai(t) for t in kwargs.pop("tools", None) or ()]
        choice = normalize_tool_choice(kwargs.pop("tool_choice", None), [t.name for t in tools])
        response_format = kwargs.pop("response_format", None)
        max_tokens = kwargs.pop("max_tokens", self.max_tokens) or 256
        options = GenerationOptions(
            max_new_tokens=max_tokens,
            temperature=kwargs.pop("temperature", self.temperature),
            top_p=kwargs.pop("top_p", self.top_p),
            top_k=kwargs.pop("top_k", self.top_k),
            seed=kwargs.pop("seed", self.seed),
            stop=tuple(stop if stop is not None else kwargs.pop("stop", None) or self.stop or ()),
        )
        alpha = kwargs.pop("alpha", self.alpha)
        timeout = kwargs.pop("timeout", self.timeout)
        if kwargs:
            raise ValueError(f"unsupported keyword arguments for ChatNGSD: {sorted(kwargs)}")

        neutral = [_to_neutral(m) for m in messages]
        active_tools = tools if choice != "none" else []
        if response_format is not None:
            schema = _response_schema(response_format)
            neutral.insert(0, {"role": "system", "content": schema_instruction(schema)})
        prompt, template_tools = prepare_messages(neutral, active_tools or None, decoder.tokenizer, choice)
        decode_kwargs: dict[str, Any] = {}
        if alpha is not None:
            decode_kwargs["alpha"] = alpha
        if template_tools:
            decode_kwargs["tools"] = template_tools
        if response_format is not None:
            decode_kwargs["constraint"] = structured_output_constraint(decoder.tokenizer, decoder.vocab_size, schema)
        elif active_tools:
            decode_kwargs["constraint"] = tool_call_constraint(decoder.tokenizer, decoder.vocab_size, active_tools, choice)
            # Rate the user's request, not the tool instructions around it.
        users = [m["content"] for m in neutral if m["role"] == "user" and m["content"].strip()]
        if users:
            decode_kwargs["risk_request"] = users[-1]
        request = Request(prompt, options, decode_kwargs, parse_tools=bool(active_tools), timeout=timeout)
        guard = registry.get_guard(decoder, self.tool_guard) if active_tools and not structured else None
        if guard is not None and guard.enabled:
            request.guard, request.guard_context = guard, guard.prepare(neutral)
            if alpha is None and (tainted_alpha := request.guard.alpha_for(request.guard_context)) is not None:
                decode_kwargs["alpha"] = tainted_alpha
        return decoder, request

    def _message(self, generation: Generation, request: Request, model: str) -> tuple[AIMessage, GuardReview | None]:
        content, calls, refusal, metadata, review = _answer(generation, request, model)
        message = AIMessage(
            content=content,
            tool_calls=[_lc_tool_call(c) for c in calls],
            additional_kwargs={"refusal": refusal} if refusal else {},
            response_metadata=metadata,
            usage_metadata=usage_metadata(generation),
        )
        return message, review

    # ---------------------------------------------------------------- generation
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop, run_manager, **kwargs))
            return _result_from_chunks(chunks)
        model = kwargs.get("model") or self.model
        decoder, request = self._request(messages, stop, kwargs)
        events = stream_generation(decoder, request, threading.Event())
        generation = drain(events)
        message, review = self._message(generation, request, model)
        dispatch_guard_event(run_manager, review)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": model})

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = [c async for c in self._astream(messages, stop, run_manager, **kwargs)]
            return _result_from_chunks(chunks)
        model = kwargs.get("model") or self.model
        # Off the event loop: the first call loads weights, a step with tool results rates them.
        decoder, request = await asyncio.to_thread(self._request, messages, stop, kwargs)
        generation = None
        async for item in astream_generation(decoder, request):
            if isinstance(item, Generation):
                generation = item
        assert generation is not None
        message, review = self._message(generation, request, model)
        await adispatch_guard_event(run_manager, review)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": model})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        model = kwargs.get("model") or self.model
        decoder, request = self._request(messages, stop, kwargs)
        cancel = threading.Event()
        events = stream_generation(decoder, request, cancel)
        chunker = _Chunker(request, model)
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    yield from chunker.finish(done.value)
                    dispatch_guard_event(run_manager, chunker.review)
                    return
                yield from chunker.delta(event.text)
        finally:
            cancel.set()  # a consumer that stops early ends the generation within one token

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        model = kwargs.get("model") or self.model
        decoder, request = await asyncio.to_thread(self._request, messages, stop, kwargs)
        chunker = _Chunker(request, model)
        async for item in astream_generation(decoder, request):
            chunks = chunker.finish(item) if isinstance(item, Generation) else chunker.delta(item.text)
            for chunk in chunks:
                yield chunk
        await adispatch_guard_event(run_manager, chunker.review)


class _Chunker:
    """Turns text deltas into message chunks: prose as content as it arrives, tool calls at the end.

    Calls are held back until the generation ends so the tool-call guard sees all of them
    before any leaves the model; then they go out as ``tool_call_chunks`` or, blocked (or turned
    into a refusal by the gate), are replaced by the refusal.
    """

    def __init__(self, request: Request, model: str):
        self.request, self.model = request, model
        self.splitter = ToolCallSplitter() if request.parse_tools else None
        self.review: GuardReview | None = None

    def delta(self, text: str, final: bool = False) -> list[ChatGenerationChunk]:
        if self.splitter is None:
            return [ChatGenerationChunk(message=AIMessageChunk(content=text))] if text else []
        pieces = self.splitter.feed(text, final)  # calls are parsed again, whole, in finish()
        return [ChatGenerationChunk(message=AIMessageChunk(content=p)) for p in pieces if isinstance(p, str) and p]

    def finish(self, generation: Generation) -> list[ChatGenerationChunk]:
        _, calls, refusal, metadata, self.review = _answer(generation, self.request, self.model)
        replaced = generation.finish_reason == "refused" or (self.review is not None and self.review.blocked)
        if self.splitter is not None and replaced:
            chunks = [ChatGenerationChunk(message=AIMessageChunk(content=refusal))]
        else:
            chunks = self.delta("", final=True) if self.splitter is not None else []
        for index, call in enumerate(calls):
            tool_chunk = {
                "name": call.name,
                "args": json.dumps(call.arguments, ensure_ascii=False),
                "id": call.id,
                "index": index,
                "type": "tool_call_chunk",
            }
            chunks.append(ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[tool_chunk])))
        last = AIMessageChunk(
            content="",
            additional_kwargs={"refusal": refusal} if refusal else {},
            response_metadata=metadata,
            usage_metadata=usage_metadata(generation),
            chunk_position="last",
        )
        chunks.append(ChatGenerationChunk(message=last, generation_info={"finish_reason": generation.finish_reason}))
        return chunks


def _answer(
    generation: Generation, request: Request, model: str
) -> tuple[str, list[ToolCall], str | None, dict[str, Any], GuardReview | None]:
    """An answer's content, the calls that leave the model, its refusal text (if it is one), its
    response metadata and the tool-call guard's review."""
    content, calls = answer_parts(generation, request.parse_tools)
    metadata = generation_metadata(generation, model)
    refusal = content if metadata["refused"] else None
    review = request.review(calls)
    if review is not None:
        metadata["tool_guard"] = review.to_metadata()
        calls = review.calls
        if review.blocked:
            content = refusal = review.refusal
    return content, calls, refusal, metadata, review


def _result_from_chunks(chunks: list[ChatGenerationChunk]) -> ChatResult:
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    message = merged.message
    ai = AIMessage(
        content=message.content,
        tool_calls=message.tool_calls,
        additional_kwargs=message.additional_kwargs,
        response_metadata=message.response_metadata,
        usage_metadata=message.usage_metadata,
        id=message.id,
    )
    return ChatResult(generations=[ChatGeneration(message=ai, generation_info=merged.generation_info)])


def _lc_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "args": call.arguments, "id": call.id, "type": "tool_call"}


def _response_schema(response_format: Any) -> dict[str, Any]:
    if isinstance(response_format, Mapping):
        if response_format.get("type") == "json_schema" and "json_schema" in response_format:
            return dict(response_format["json_schema"].get("schema", {}))
        return dict(response_format)
    return convert_to_json_schema(response_format)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or ():
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def _to_neutral(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message as the neutral dict ``tools.prepare_messages`` takes."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": _text(message.content)}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": _text(message.content)}
    if isinstance(message, AIMessage):
        calls = [ToolCall(name=c["name"], arguments=dict(c.get("args") or {}), id=c.get("id") or "") for c in message.tool_calls]
        return {"role": "assistant", "content": _text(message.content), "tool_calls": calls}
    if isinstance(message, ToolMessage):
        content = _text(message.content) if not isinstance(message.content, str) else message.content
        if getattr(message, "status", "success") == "error" and not content.lower().startswith("error"):
            content = f"Error: {content}"
        return {"role": "tool", "content": content, "tool_call_id": message.tool_call_id, "name": message.name}
    if isinstance(message, FunctionMessage):
        return {"role": "tool", "content": _text(message.content), "name": message.name}
    if isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        return {"role": role, "content": _text(message.content)}
    raise ValueError(f"message type {type(message).__name__} is not supported")


# ---------------------------------------------------------------- refusal content block
def _translate(message: AIMessage) -> list[Any]:
    refusal = message.additional_kwargs.get("refusal")
    if not refusal:
        raise NotImplementedError  # LangChain's best-effort parsing handles everything else
    metadata = {k: v for k, v in message.response_metadata.items() if k != "model_provider"}
    blocks = list(message.model_copy(update={"response_metadata": metadata}).content_blocks)
    blocks.append({"type": "refusal", "refusal": refusal, "extras": {"source": "ngsd_gate"}})
    return blocks


register_translator(PROVIDER, _translate, _translate)
