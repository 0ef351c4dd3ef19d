"""Simulated models: ``echo`` for predictions and ``tokens`` for LLM-like generation."""

from reference_server.models.base import GenerationPlan, GenerativeModel, PredictiveModel
from reference_server.models.echo import EchoModel
from reference_server.models.tokens import TokensModel

__all__ = ["EchoModel", "GenerationPlan", "GenerativeModel", "PredictiveModel", "TokensModel"]
