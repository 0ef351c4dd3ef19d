"""The two model interfaces the scheduler drives.

Costs are returned as seconds rather than spent: the scheduler decides how to wait (a real sleep on a
server, virtual time in tests), which keeps the models pure and deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol


class PredictiveModel(Protocol):
    name: str
    version: str

    def batch_cost_s(self, size: int) -> float: ...

    def predict_batch(self, inputs: list[Any]) -> list[Any]: ...


@dataclass
class GenerationPlan:
    """What a sequence will do, decided up front so a seed fixes every token and every fault."""

    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "length" when the request set max_tokens, else "stop"
    rng: random.Random = field(repr=False)
    fail_at: int | None = None  # token index at which the model raises
    stall_at: int | None = None  # token index before which the sequence stalls
    stall_s: float = 0.0


class GenerativeModel(Protocol):
    name: str
    version: str

    def plan(self, prompt: str, max_tokens: int | None, seed: int | None) -> GenerationPlan: ...

    def prefill_cost_s(self, prompt_tokens: int) -> float: ...

    def step_cost_s(self, running: int) -> float: ...

    def next_token(self, plan: GenerationPlan) -> str: ...
