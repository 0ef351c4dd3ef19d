"""The ``tokens`` model as a worker's token source: job → numbered chunks, each with its simulated cost.

The model is deterministic (prompt, request seed, model seed), so token ``i`` of a job is the same on
every worker: a worker resuming after ``sent`` tokens replays the model's draws for them without waiting
or writing, and goes on with token ``sent`` — exactly what the first worker would have written next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from reference_server.models.tokens import TokensModel
from reference_server.queue.jobs import Chunk, Job
from reference_server.settings import ServerSettings, TokensModelSpec


class UnknownJobModel(LookupError):
    """A job names a model this worker does not run."""


@dataclass
class ModelSource:
    """Every ``tokens`` model version of the settings, callable as a worker's ``TokenSource``.

    ``running`` is the batch size the step cost is charged for (a worker sets it per batch): one step
    advances every job of the batch, and costs ``base + per_seq × running``.
    """

    models: dict[str, TokensModel]  # "name@version" and "name" (the version listed last) → model
    running: int = 1

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ModelSource:
        models: dict[str, TokensModel] = {}
        for spec in settings.models:
            if isinstance(spec, TokensModelSpec):
                model = TokensModel(spec)
                models[f"{spec.name}@{spec.version}"] = model
                models[spec.name] = model  # the last listed version serves, as on the server
        return cls(models)

    def pin(self, ref: str, model: TokensModel) -> None:
        """Keep ``model`` under ``ref`` (``name@version``): an in-process front end routes a job through the
        server's registry (versions, A/B splits, hot-swaps) and pins the version it chose, so the job runs
        on it even if a hot-swap retires that version before the job starts."""
        self.models.setdefault(ref, model)

    def resolve(self, ref: str) -> TokensModel:
        model = self.models.get(ref.removesuffix("@latest"))
        if model is None:
            raise UnknownJobModel(f"no tokens model {ref!r} on this worker (it runs {sorted(self.models)})")
        return model

    def warm_up(self) -> None:
        """A dummy generation per model version, before the worker takes any job (pre-warm)."""
        for model in set(self.models.values()):
            plan = model.plan("warm up", 2, 0)
            for _ in range(plan.output_tokens):
                model.next_token(plan)

    def __call__(self, job: Job, sent: int) -> Iterator[tuple[float, Chunk]]:
        try:
            model = self.resolve(job.model)
        except UnknownJobModel as exc:
            yield 0.0, Chunk(sent, "error", "unknown_model", str(exc))
            return
        plan = model.plan(job.prompt, job.max_tokens, job.seed)
        for _ in range(min(sent, plan.output_tokens)):  # replay the draws of the tokens already sent
            model.next_token(plan)
        every, total = job.progress_every, plan.output_tokens
        if every is not None:
            what = "started" if sent == 0 else f"resumed after {sent} of {total} tokens"
            yield 0.0, Chunk(sent, "log", "", f"job {what} on model {model.name}@{model.version}")
        first = True
        for i in range(sent, plan.output_tokens):
            wait = model.step_cost_s(self.running)
            if first:  # a job joining (or rejoining) a batch pays its prefill
                wait += model.prefill_cost_s(plan.prompt_tokens)
                first = False
            if plan.stall_at == i:
                wait += plan.stall_s
            if plan.fail_at == i:
                yield wait, Chunk(i, "error", "model_error", "the model failed", model.version)
                return
            yield wait, Chunk(i, "token", model.next_token(plan))
            if every is not None and (i + 1) % every == 0 and i + 1 < total:
                yield 0.0, Chunk(i + 1, "progress", progress_data(i + 1, total))
        end = max(sent, total)
        if every is not None:
            yield 0.0, Chunk(end, "complete", progress_data(end, total), f"generated {total} tokens")
        yield 0.0, Chunk(end, "done", plan.finish_reason, model_version=model.version)


def progress_data(step: int, steps: int) -> str:
    """A progress or complete event's JSON: tokens done of the job's planned length."""
    percent = 100.0 if steps == 0 else round(100 * step / steps, 1)
    return orjson.dumps({"percent": percent, "step": step, "steps": steps}).decode()
