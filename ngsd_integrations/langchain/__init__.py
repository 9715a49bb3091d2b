"""LangChain integration: ``ChatNGSD`` (chat model) and ``NGSDLLM`` (text completion).

Install with ``pip install "ngsd-integrations[langchain]"``. Both classes share one lazily
loaded decoder per set of models, so constructing many of them is cheap.
"""

from .chat_models import ChatNGSD
from .llms import NGSDLLM

__all__ = ["ChatNGSD", "NGSDLLM"]
