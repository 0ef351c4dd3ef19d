"""``echo``: a prediction model that returns its input, with a per-batch cost."""

from __future__ import annotations

from typing import Any

from reference_server.settings import EchoModelSpec


class EchoModel:
    def __init__(self, spec: EchoModelSpec) -> None:
        self.name = spec.name
        self.version = spec.version
        self._base_s = spec.base_ms / 1000
        self._per_item_s = spec.per_item_ms / 1000

    def batch_cost_s(self, size: int) -> float:
        return self._base_s + self._per_item_s * size

    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)
