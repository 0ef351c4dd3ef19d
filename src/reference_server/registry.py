"""The models a server hosts, each behind the scheduler that batches for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

import anyio

from reference_server.batcher import BatchPolicy, RequestBatcher
from reference_server.errors import InvalidRequest, UnknownModel
from reference_server.metrics import ServerMetrics
from reference_server.models import EchoModel, TokensModel
from reference_server.scheduler import ContinuousScheduler
from reference_server.settings import EchoModelSpec, ServerSettings


@dataclass
class ModelRegistry:
    batchers: dict[str, RequestBatcher] = field(default_factory=dict)
    schedulers: dict[str, ContinuousScheduler] = field(default_factory=dict)
    default_generator: str = ""

    @classmethod
    def from_settings(cls, settings: ServerSettings, metrics: ServerMetrics) -> ModelRegistry:
        registry = cls(default_generator=settings.model)
        policy = BatchPolicy(settings.batch_size, settings.batch_timeout_ms / 1000)
        for spec in settings.models:
            if isinstance(spec, EchoModelSpec):
                registry.batchers[spec.name] = RequestBatcher(
                    EchoModel(spec), policy, max_queue=settings.max_queue, metrics=metrics
                )
            else:
                registry.schedulers[spec.name] = ContinuousScheduler(
                    TokensModel(spec),
                    max_num_seqs=settings.max_num_seqs,
                    max_queue=settings.max_queue,
                    stream_buffer=settings.stream_buffer,
                    metrics=metrics,
                )
        return registry

    def batcher(self, name: str | None) -> RequestBatcher:
        if name is None and self.batchers:
            return next(iter(self.batchers.values()))
        found = self.batchers.get(name or "")
        if found is None:
            if name in self.schedulers:
                raise InvalidRequest(
                    f"model {name!r} generates tokens; use /v1/stream or /v1/completions", field="model"
                )
            self._missing("prediction", name)
        return found

    def scheduler(self, name: str | None) -> ContinuousScheduler:
        found = self.schedulers.get(name or self.default_generator)
        if found is None:
            if name in self.batchers:
                raise InvalidRequest(f"model {name!r} is a prediction model; use /predict", field="model")
            self._missing("generative", name)
        return found

    def _missing(self, kind: str, name: str | None) -> NoReturn:
        have = sorted(self.batchers if kind == "prediction" else self.schedulers)
        raise UnknownModel(f"no {kind} model named {name!r}; this server has {have}", field="model")

    def names(self) -> list[tuple[str, str, str]]:
        """(name, version, kind) of every model."""
        rows = [(n, b.model.version, "prediction") for n, b in self.batchers.items()]
        rows += [(n, s.model.version, "generation") for n, s in self.schedulers.items()]
        return rows

    async def run(self) -> None:
        """Run every batcher and scheduler until cancelled."""
        async with anyio.create_task_group() as tg:
            for b in self.batchers.values():
                tg.start_soon(b.run)
            for s in self.schedulers.values():
                tg.start_soon(s.run)

    def stop_accepting(self) -> None:
        for b in self.batchers.values():
            b.stop_accepting()
        for s in self.schedulers.values():
            s.stop_accepting()
