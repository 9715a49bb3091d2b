"""A conformance suite for LlamaIndex LLMs, mirroring LangChain's standard tests.

LlamaIndex ships no standard test suite, so this one checks what its query engines, chat
engines, agents and instrumentation rely on: every public method sync and async, streamed
deltas joining to the full text with cumulative ``text``, metadata, legacy callbacks and
instrumentation events on every call, token usage, per-call stop / max tokens without touching
shared state, structured output and tool calls valid for their schema, a non-blocking event
loop and cancellation of abandoned async streams.

``LlamaIndexLLMConformance`` is model-agnostic: a subclass provides the ``llm`` fixture (a
factory taking per-instance keyword arguments). Two subclasses run it here: over a tiny
random-weight pair (fast, every run) and over the embedded SmolLM2 pair (``integration``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Callable, Literal

import pytest
from pydantic import BaseModel, Field

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool

PROMPT = "Name one colour."
MESSAGES = [ChatMessage(role=MessageRole.USER, content=PROMPT)]


class WeatherArgs(BaseModel):
    city: str = Field(description="city name", max_length=24)
    unit: Literal["C", "F"] = "C"


def get_weather(city: str, unit: str = "C") -> str:
    """Current weather of a city, in unit C or F."""
    return f"Sunny, 21 degrees {unit} in {city}."


def weather_tool() -> FunctionTool:
    # Bounded arguments, so even a random-weight model closes the call within the budget.
    return FunctionTool.from_defaults(get_weather, fn_schema=WeatherArgs)


class Colour(BaseModel):
    """A colour and whether it is warm."""

    name: str = Field(description="the colour's name", max_length=20)
    warm: bool


class _Recorder(BaseEventHandler):
    """Collects instrumentation event class names."""

    events: list[str] = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(type(event).__name__)


async def _collect(agen: Any) -> list[Any]:
    return [item async for item in agen]


class LlamaIndexLLMConformance:
    """Subclass and provide ``llm`` (a factory ``llm(**kwargs) -> LLM``) and ``max_new_tokens``."""

    max_new_tokens = 8
    tool_max_new_tokens = 96

    @pytest.fixture
    def llm(self) -> Callable[..., FunctionCallingLLM]:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    @pytest.fixture
    def model(self, llm: Callable[..., FunctionCallingLLM]) -> FunctionCallingLLM:
        return llm(max_new_tokens=self.max_new_tokens)

    # ------------------------------------------------------------------ metadata
    def test_is_function_calling_llm(self, model: FunctionCallingLLM) -> None:
        assert isinstance(model, FunctionCallingLLM)

    def test_metadata(self, model: FunctionCallingLLM) -> None:
        meta = model.metadata
        assert meta.is_chat_model and meta.is_function_calling_model
        assert meta.context_window > meta.num_output == self.max_new_tokens
        assert meta.model_name and meta.model_name != "unknown"

    def test_serialisable(self, model: FunctionCallingLLM) -> None:
        data = model.to_dict()
        assert data["class_name"] == model.class_name()
        json.dumps(data, default=str)

    # ------------------------------------------------------------------ every public method
    def test_complete(self, model: FunctionCallingLLM) -> None:
        response = model.complete(PROMPT)
        assert isinstance(response, CompletionResponse) and response.text
        self._check_usage(response.raw)

    def test_chat(self, model: FunctionCallingLLM) -> None:
        response = model.chat(MESSAGES)
        assert isinstance(response, ChatResponse) and response.message.role == MessageRole.ASSISTANT
        assert response.message.content
        self._check_usage(response.raw)

    def test_complete_and_chat_format_alike(self, model: FunctionCallingLLM) -> None:
        assert model.complete(PROMPT).text == model.chat(MESSAGES).message.content

    def test_stream_complete(self, model: FunctionCallingLLM) -> None:
        chunks = list(model.stream_complete(PROMPT))
        self._check_stream([c.text for c in chunks], [c.delta for c in chunks], model.complete(PROMPT).text)
        self._check_usage(chunks[-1].raw)

    def test_stream_chat(self, model: FunctionCallingLLM) -> None:
        chunks = list(model.stream_chat(MESSAGES))
        texts = [c.message.content for c in chunks]
        self._check_stream(texts, [c.delta for c in chunks], model.chat(MESSAGES).message.content)
        self._check_usage(chunks[-1].raw)

    async def test_acomplete(self, model: FunctionCallingLLM) -> None:
        response = await model.acomplete(PROMPT)
        assert response.text == model.complete(PROMPT).text
        self._check_usage(response.raw)

    async def test_achat(self, model: FunctionCallingLLM) -> None:
        response = await model.achat(MESSAGES)
        assert response.message.content == model.chat(MESSAGES).message.content
        self._check_usage(response.raw)

    async def test_astream_complete(self, model: FunctionCallingLLM) -> None:
        chunks = await _collect(await model.astream_complete(PROMPT))
        self._check_stream([c.text for c in chunks], [c.delta for c in chunks], model.complete(PROMPT).text)
        self._check_usage(chunks[-1].raw)

    async def test_astream_chat(self, model: FunctionCallingLLM) -> None:
        chunks = await _collect(await model.astream_chat(MESSAGES))
        texts = [c.message.content for c in chunks]
        self._check_stream(texts, [c.delta for c in chunks], model.chat(MESSAGES).message.content)
        self._check_usage(chunks[-1].raw)

    def test_predict_and_stream_helpers(self, model: FunctionCallingLLM) -> None:
        template = PromptTemplate("Name one {thing}.")
        assert model.predict(template, thing="colour") == model.chat(MESSAGES).message.content
        assert "".join(model.stream(template, thing="colour")) == model.chat(MESSAGES).message.content

    def test_multi_turn_with_system_messages(self, model: FunctionCallingLLM) -> None:
        history = [
            ChatMessage(role=MessageRole.SYSTEM, content="You are terse."),
            ChatMessage(role=MessageRole.SYSTEM, content="Answer in English."),
            ChatMessage(role=MessageRole.USER, content="Hi."),
            ChatMessage(role=MessageRole.USER, content="Name one colour."),
            ChatMessage(role=MessageRole.ASSISTANT, content="Red."),
            ChatMessage(role=MessageRole.ASSISTANT, content="Or blue."),
            ChatMessage(role=MessageRole.USER, content="Another one?"),
        ]
        assert model.chat(history).message.content

    # ------------------------------------------------------------------ callbacks and instrumentation
    @pytest.mark.parametrize("method", ["complete", "stream_complete", "chat", "stream_chat"])
    def test_callbacks_fired_sync(self, llm: Callable[..., FunctionCallingLLM], method: str) -> None:
        debug, counter = LlamaDebugHandler(), TokenCountingHandler()
        model = llm(max_new_tokens=self.max_new_tokens, callback_manager=CallbackManager([debug, counter]))
        result = getattr(model, method)(PROMPT if "complete" in method else MESSAGES)
        if method.startswith("stream"):
            list(result)
        self._check_callbacks(debug, counter)

    @pytest.mark.parametrize("method", ["acomplete", "astream_complete", "achat", "astream_chat"])
    async def test_callbacks_fired_async(self, llm: Callable[..., FunctionCallingLLM], method: str) -> None:
        debug, counter = LlamaDebugHandler(), TokenCountingHandler()
        model = llm(max_new_tokens=self.max_new_tokens, callback_manager=CallbackManager([debug, counter]))
        result = await getattr(model, method)(PROMPT if "complete" in method else MESSAGES)
        if method.startswith("astream"):
            await _collect(result)
        self._check_callbacks(debug, counter)

    def test_instrumentation_events(self, model: FunctionCallingLLM) -> None:
        recorder = _Recorder()
        recorder.events = []
        dispatcher = get_dispatcher()
        dispatcher.add_event_handler(recorder)
        try:
            model.complete(PROMPT)
            list(model.stream_chat(MESSAGES))
        finally:
            dispatcher.event_handlers.remove(recorder)
        for name in ("LLMCompletionStartEvent", "LLMCompletionEndEvent", "LLMChatStartEvent", "LLMChatEndEvent", "LLMChatInProgressEvent"):
            assert name in recorder.events, recorder.events

    # ------------------------------------------------------------------ per-call options
    def test_max_new_tokens_per_call(self, model: FunctionCallingLLM) -> None:
        response = model.complete(PROMPT, max_new_tokens=3)
        assert response.raw["usage"]["completion_tokens"] <= 3
        assert model.metadata.num_output == self.max_new_tokens  # shared state untouched

    def test_stop_per_call(self, model: FunctionCallingLLM) -> None:
        full = model.complete(PROMPT).text
        assert len(full) > 4, full
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        if not stop.strip():
            pytest.skip(f"no usable stop string in {full!r}")
        expected = full[: full.find(stop)]
        assert model.complete(PROMPT, stop=[stop]).text == expected
        chunks = list(model.stream_complete(PROMPT, stop=[stop]))
        assert "".join(c.delta for c in chunks) == expected
        assert model.complete(PROMPT).text == full  # the stop did not stick

    def test_sampling_per_call_is_seeded(self, model: FunctionCallingLLM) -> None:
        first = model.complete(PROMPT, temperature=0.8, seed=3).text
        assert model.complete(PROMPT, temperature=0.8, seed=3).text == first

    # ------------------------------------------------------------------ async behaviour
    async def test_async_does_not_block_event_loop(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        model = llm(max_new_tokens=max(self.max_new_tokens, 16))
        model.complete(PROMPT, max_new_tokens=1)  # load weights outside the measurement
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        await model.achat(MESSAGES)
        elapsed = time.perf_counter() - started
        task.cancel()
        # A blocked loop would tick ~0 times; a free one ~elapsed/0.01 times.
        assert ticks >= min(5, elapsed / 0.01 / 4), (ticks, elapsed)

    async def test_concurrent_async_calls(self, model: FunctionCallingLLM) -> None:
        expected = model.chat(MESSAGES).message.content
        results = await asyncio.gather(*(model.achat(MESSAGES) for _ in range(3)))
        assert [r.message.content for r in results] == [expected] * 3

    async def test_abandoned_async_stream_is_cancelled(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        model = llm(max_new_tokens=400)
        model.complete(PROMPT, max_new_tokens=1)
        before = {t.ident for t in threading.enumerate()}
        stream = await model.astream_complete("Count from 1 to 1000, one number per line.")
        async for _ in stream:
            break
        await stream.aclose()
        workers = [t for t in threading.enumerate() if t.ident not in before]
        deadline = time.monotonic() + 20
        while any(t.is_alive() for t in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not any(t.is_alive() for t in workers), "the worker thread kept generating"

    # ------------------------------------------------------------------ structured output and tools
    def test_structured_predict(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        model = llm(max_new_tokens=64)
        colour = model.structured_predict(Colour, PromptTemplate("Describe the colour {c} as JSON."), c="red")
        assert isinstance(colour, Colour)

    async def test_astructured_predict(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        model = llm(max_new_tokens=64)
        colour = await model.astructured_predict(Colour, PromptTemplate("Describe the colour {c} as JSON."), c="blue")
        assert isinstance(colour, Colour)

    def test_tool_call_required(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        model, tool = llm(max_new_tokens=self.tool_max_new_tokens), weather_tool()
        response = model.chat_with_tools([tool], user_msg="What is the weather in Paris?", tool_required=True)
        calls = model.get_tool_calls_from_response(response)
        assert len(calls) == 1 and calls[0].tool_name == "get_weather" and calls[0].tool_id
        tool.metadata.fn_schema.model_validate(calls[0].tool_kwargs)  # valid for the tool's schema

    async def test_tool_call_by_name_async_stream(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        model, tool = llm(max_new_tokens=self.tool_max_new_tokens), weather_tool()
        stream = await model.astream_chat_with_tools([tool], user_msg="Weather in Rome?", tool_choice="get_weather")
        chunks = await _collect(stream)
        calls = model.get_tool_calls_from_response(chunks[-1])
        assert [c.tool_name for c in calls] == ["get_weather"]
        tool.metadata.fn_schema.model_validate(calls[0].tool_kwargs)
        assert "".join(c.delta or "" for c in chunks) == chunks[-1].message.content

    def test_predict_and_call(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        model, tool = llm(max_new_tokens=self.tool_max_new_tokens), weather_tool()
        result = model.predict_and_call([tool], user_msg="Weather in Oslo?", tool_required=True)
        assert result.sources and not result.sources[0].is_error and "Sunny" in result.response

    def test_no_tool_call_is_reported(self, model: FunctionCallingLLM) -> None:
        response = model.chat(MESSAGES)
        assert model.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
        with pytest.raises(ValueError):
            model.get_tool_calls_from_response(response, error_on_no_tool_call=True)

    def test_tool_turns_in_history(self, model: FunctionCallingLLM) -> None:
        tool = weather_tool()
        call = model.chat_with_tools([tool], user_msg="Weather in Paris?", tool_required=True, max_new_tokens=self.tool_max_new_tokens)
        selection = model.get_tool_calls_from_response(call)[0]
        history = [
            ChatMessage(role=MessageRole.USER, content="Weather in Paris?"),
            call.message,
            ChatMessage(
                role=MessageRole.TOOL,
                content=get_weather(**selection.tool_kwargs),
                additional_kwargs={"tool_call_id": selection.tool_id},
            ),
        ]
        answer = model.chat_with_tools([tool], chat_history=history, tool_choice="none")
        assert answer.message.content and not model.get_tool_calls_from_response(answer, error_on_no_tool_call=False)

    # ------------------------------------------------------------------ helpers
    def _check_usage(self, raw: Any) -> None:
        usage = raw["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert raw["safety"]["tokens"] == usage["completion_tokens"]

    @staticmethod
    def _check_stream(texts: list[str], deltas: list[str | None], full: str) -> None:
        assert len(texts) >= 2, texts
        joined = ""
        for text, delta in zip(texts, deltas):
            joined += delta or ""
            assert text == joined  # cumulative text, delta is the new part
        assert joined == full

    @staticmethod
    def _check_callbacks(debug: LlamaDebugHandler, counter: TokenCountingHandler) -> None:
        pairs = debug.get_event_pairs(CBEventType.LLM)
        assert len(pairs) == 1 and len(pairs[0]) == 2, pairs
        assert counter.prompt_llm_token_count > 0 and counter.completion_llm_token_count > 0


# ---------------------------------------------------------------------- the runs
class TestNGSDConformanceTiny(LlamaIndexLLMConformance):
    """Tiny random-weight LoRA pair on the real SmolLM2 tokenizer: fast, no trained weights."""

    @pytest.fixture
    def llm(self, tiny_adapter_pair: Any) -> Callable[..., FunctionCallingLLM]:
        from ngsd_integrations import GatedDecoder, NGSDConfig, RiskPolicy
        from ngsd_integrations.llama_index import NGSD

        decoder = GatedDecoder(tiny_adapter_pair, NGSDConfig(risk=RiskPolicy(enabled=False)))
        return lambda **kwargs: NGSD(decoder=decoder, **kwargs)


@pytest.mark.integration
class TestNGSDConformanceEmbedded(LlamaIndexLLMConformance):
    """The embedded SmolLM2-135M-Instruct with its default safety expert, loaded via the registry."""

    max_new_tokens = 10
    tool_max_new_tokens = 40

    @pytest.fixture
    def llm(self, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FunctionCallingLLM]:
        from ngsd_integrations.llama_index import NGSD

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return lambda **kwargs: NGSD(**kwargs)

    def test_risk_rating_in_raw(self, llm: Callable[..., FunctionCallingLLM]) -> None:
        from ngsd_integrations import NGSDConfig, RiskPolicy

        model = llm(max_new_tokens=4, ngsd_config=NGSDConfig(risk=RiskPolicy(enabled=True)))
        safety = model.complete(PROMPT).raw["safety"]
        assert safety["risk"] is not None and set(safety["risk_scores"]) == {"severity", "actionability", "evasion", "targeting"}
