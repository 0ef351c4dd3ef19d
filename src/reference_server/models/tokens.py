"""``tokens``: an LLM-like generator over a built-in vocabulary, deterministic under a seed.

The same prompt, request seed and model seed always give the same tokens and the same faults, in
any process: seeds are mixed with a stable digest of the prompt, never Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
import random

from reference_server.models.base import GenerationPlan
from reference_server.models.vocabulary import WORDS
from reference_server.settings import TokensModelSpec


def count_prompt_tokens(prompt: str) -> int:
    """Prompt length in tokens: whitespace-separated words (documented; no tokenizer on purpose)."""
    return len(prompt.split())


class TokensModel:
    def __init__(self, spec: TokensModelSpec) -> None:
        self.name = spec.name
        self.version = spec.version
        self._spec = spec
        self._base_s = spec.base_ms / 1000
        self._per_seq_s = spec.per_seq_ms / 1000
        self._prefill_s = spec.prefill_ms / 1000
        self._per_input_token_s = spec.per_input_token_ms / 1000

    def plan(self, prompt: str, max_tokens: int | None, seed: int | None) -> GenerationPlan:
        spec = self._spec
        digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        mixed = int.from_bytes(digest, "big") ^ (spec.seed * 0x9E3779B97F4A7C15) ^ ((seed or 0) << 1)
        rng = random.Random(mixed)
        if max_tokens is not None:
            length, finish = min(max_tokens, spec.max_tokens_limit), "length"
        else:
            lo, hi = spec.output_tokens.min, max(spec.output_tokens.min, spec.output_tokens.max)
            length, finish = rng.randint(lo, hi), "stop"
        plan = GenerationPlan(
            prompt_tokens=count_prompt_tokens(prompt), output_tokens=length, finish_reason=finish, rng=rng
        )
        # Draw the fault dice even when rates are zero, so enabling faults does not change the tokens.
        fail_roll, stall_roll, where = rng.random(), rng.random(), rng.random()
        if fail_roll < spec.fail_rate:
            plan.fail_at = int(where * length)
        elif stall_roll < spec.stall_rate:
            plan.stall_at = int(where * length)
            plan.stall_s = spec.stall_ms / 1000
        return plan

    def prefill_cost_s(self, prompt_tokens: int) -> float:
        return self._prefill_s + self._per_input_token_s * prompt_tokens

    def step_cost_s(self, running: int) -> float:
        return self._base_s + self._per_seq_s * running

    def next_token(self, plan: GenerationPlan) -> str:
        return " " + plan.rng.choice(WORDS)
