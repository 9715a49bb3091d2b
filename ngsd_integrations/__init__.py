"""Neuron-gated safe decoding (NGSD) for transformers models.

A base chat model and a small safety expert decode side by side; a single leaky
integrate-and-fire neuron decides, token by token, when the expert's distribution is blended in.
"""

from .config import EarlyStopConfig, GateConfig, GenerationOptions, NGSDConfig, RiskPolicy
from .constraints import GrammarConstraint
from .decoder import GatedDecoder, Generation, PromptTooLongError, TokenEvent
from .models import ModelPair
from .risk import RiskAssessment
from .trace import SafetyTrace

__all__ = [
    "EarlyStopConfig",
    "GateConfig",
    "GatedDecoder",
    "Generation",
    "GenerationOptions",
    "GrammarConstraint",
    "ModelPair",
    "NGSDConfig",
    "PromptTooLongError",
    "RiskAssessment",
    "RiskPolicy",
    "SafetyTrace",
    "TokenEvent",
]
