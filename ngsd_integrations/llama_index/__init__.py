"""LlamaIndex integration: ``NGSD``, a function-calling LLM generating through the gated decoder.

Install with ``pip install ngsd-integrations[llama-index]``.
"""

from .base import NGSD

__all__ = ["NGSD"]
