"""NGSDLLM: a LangChain text-completion model that generates through the gated decoder."""

from __future__ import annotations

import threading
from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.llms import LangSmithParams
from langchain_core.outputs import Generation as LCGeneration
from langchain_core.outputs import GenerationChunk, LLMResult

from ..config import GenerationOptions
from ..decoder import Generation, drain
from ._shared import NGSDFields, Request, astream_generation, generation_metadata, stream_generation

__all__ = ["NGSDLLM"]


class NGSDLLM(NGSDFields, BaseLLM):
    """Text-in, text-out LangChain model guarded token by token by NGSD.

    Shares its decoder (and weights) with every ``ChatNGSD`` / ``NGSDLLM`` over the same models.
    By default a prompt is sent as one user turn through the chat template (the models are chat
    models); set ``use_chat_template=False`` to feed the prompt verbatim.

    .. code-block:: python

        from ngsd_integrations.langchain import NGSDLLM

        llm = NGSDLLM(max_tokens=64)
        llm.invoke("Write a haiku about bread.")
    """

    use_chat_template: bool = True
    """Send the prompt as a user message through the chat template (False: verbatim text)."""

    @property
    def _llm_type(self) -> str:
        return "ngsd-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**super()._identifying_params, "use_chat_template": self.use_chat_template}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._fill_ls_params(super()._get_ls_params(stop=stop, **kwargs), "llm", stop, kwargs)

    def _request(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> Request:
        kwargs = dict(kwargs)
        options = GenerationOptions(
            max_new_tokens=kwargs.pop("max_tokens", self.max_tokens) or 256,
            temperature=kwargs.pop("temperature", self.temperature),
            top_p=kwargs.pop("top_p", self.top_p),
            top_k=kwargs.pop("top_k", self.top_k),
            seed=kwargs.pop("seed", self.seed),
            stop=tuple(stop if stop is not None else self.stop or ()),
        )
        decode_kwargs: dict[str, Any] = {}
        alpha = kwargs.pop("alpha", self.alpha)
        if alpha is not None:
            decode_kwargs["alpha"] = alpha
        timeout = kwargs.pop("timeout", self.timeout)
        if kwargs:
            raise ValueError(f"unsupported keyword arguments for NGSDLLM: {sorted(kwargs)}")
        text = [{"role": "user", "content": prompt}] if self.use_chat_template else prompt
        return Request(text, options, decode_kwargs, timeout=timeout)

    def _info(self, generation: Generation) -> dict[str, Any]:
        info = generation_metadata(generation, self.model)
        info["usage"] = generation.usage
        return info

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            if self.streaming:
                text, info = "", {}
                for chunk in self._stream(prompt, stop, run_manager, **kwargs):
                    text += chunk.text
                    info = chunk.generation_info or info
                generations.append([LCGeneration(text=text, generation_info=info)])
                continue
            events = stream_generation(self.get_decoder(), self._request(prompt, stop, kwargs), threading.Event())
            generation = drain(events)
            generations.append([LCGeneration(text=generation.text, generation_info=self._info(generation))])
        return LLMResult(generations=generations, llm_output={"model_name": self.model})

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            text, info = "", {}
            async for chunk in self._astream(prompt, stop, run_manager, **kwargs):
                text += chunk.text
                info = chunk.generation_info or info
            generations.append([LCGeneration(text=text, generation_info=info)])
        return LLMResult(generations=generations, llm_output={"model_name": self.model})

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        cancel = threading.Event()
        events = stream_generation(self.get_decoder(), self._request(prompt, stop, kwargs), cancel)
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    yield GenerationChunk(text="", generation_info=self._info(done.value))
                    return
                if event.text:
                    chunk = GenerationChunk(text=event.text)
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            cancel.set()

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        request = self._request(prompt, stop, kwargs)
        async for item in astream_generation(self.get_decoder(), request):
            if isinstance(item, Generation):
                yield GenerationChunk(text="", generation_info=self._info(item))
            elif item.text:
                chunk = GenerationChunk(text=item.text)
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
