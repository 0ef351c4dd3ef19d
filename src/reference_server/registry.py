"""The models a server hosts: names, versions, aliases, A/B splits, and zero-downtime hot-swaps.

Each loaded version of a model runs behind its own engine (a ``RequestBatcher`` for prediction models,
a ``ContinuousScheduler`` for generation), as a real server runs one engine per loaded checkpoint. A
request names ``model`` (the serving version, or an A/B split), ``model@3`` (a version) or
``model@latest`` (the version loaded last).

A hot-swap loads and warms the new version beside the old one, then points new requests at it in one
step (the event loop is single-threaded, so no request sees half a swap). The old engine stops taking
requests, finishes what it holds — in-flight batches and sequences end on the version they started on —
and is stopped once idle. A load that fails leaves the old version serving, and the failure is reported
in ``GET /admin/models`` and counted.
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, NoReturn

import anyio
import anyio.abc

from reference_server.batcher import BatchPolicy, RequestBatcher
from reference_server.errors import Conflict, InvalidRequest, Overloaded, UnknownModel
from reference_server.metrics import ServerMetrics
from reference_server.models import EchoModel, TokensModel
from reference_server.scheduler import ContinuousScheduler
from reference_server.settings import EchoModelSpec, ServerSettings, TokensModelSpec

ModelSpec = EchoModelSpec | TokensModelSpec
Engine = RequestBatcher | ContinuousScheduler
Kind = Literal["prediction", "generation"]

LATEST = "latest"
_DRAIN_POLL_S = 0.01

log = logging.getLogger("reference_server")


class ModelState(enum.StrEnum):
    LOADING = "loading"  # loading and warming up; not routed to
    READY = "ready"  # routed to
    DRAINING = "draining"  # replaced: finishing what it holds, then stopped
    FAILED = "failed"  # the load failed; the previous version kept serving


class ModelLoadError(Exception):
    """Loading or warming up a model version failed."""


@dataclass(eq=False)
class Deployment:
    """One loaded (or loading) version of a model and its engine."""

    spec: ModelSpec
    engine: Engine
    state: ModelState = ModelState.LOADING
    error: str = ""
    loaded_order: int = 0
    scope: anyio.CancelScope | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return self.spec.version

    def describe(self) -> dict[str, object]:
        row: dict[str, object] = {"version": self.version, "state": self.state.value}
        if self.error:
            row["error"] = self.error
        return row


@dataclass(eq=False)
class ModelEntry:
    name: str
    kind: Kind
    versions: dict[str, Deployment] = field(default_factory=dict)
    serving: str | None = None  # the version plain ``name`` routes to
    split: dict[str, float] = field(default_factory=dict)  # A/B weights by version
    failures: list[Deployment] = field(default_factory=list)  # the last failed loads, for the admin view

    def ready(self) -> list[Deployment]:
        return [d for d in self.versions.values() if d.state is ModelState.READY]


def ab_fraction(model: str, client: str) -> float:
    """A client's stable place in [0, 1) for ``model``'s split: the same in every process and run
    (a keyed digest, not Python's salted ``hash``), so a client always sees the same version."""
    digest = hashlib.blake2b(client.encode(), key=model.encode()[:64], digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def make_engine(spec: ModelSpec, settings: ServerSettings, metrics: ServerMetrics) -> Engine:
    if isinstance(spec, EchoModelSpec):
        policy = BatchPolicy(settings.batch_size, settings.batch_timeout_ms / 1000)
        return RequestBatcher(EchoModel(spec), policy, max_queue=settings.max_queue, metrics=metrics)
    return ContinuousScheduler(
        TokensModel(spec),
        max_num_seqs=settings.max_num_seqs,
        max_queue=settings.max_queue,
        stream_buffer=settings.stream_buffer,
        history=settings.resume_buffer,
        metrics=metrics,
    )


class ModelRegistry:
    """Every model's versions and engines; ``run`` starts them, ``load`` hot-swaps one."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.default_generator = settings.model
        self.entries: dict[str, ModelEntry] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._loads = 0
        self._accepting = True
        # The hot path's answer for a plain name (or None: the default), rebuilt on every state change,
        # so a /predict costs one dict lookup rather than a walk over versions and splits.
        self._plain: dict[tuple[Kind, str | None], Engine] = {}

    @classmethod
    def from_settings(cls, settings: ServerSettings, metrics: ServerMetrics) -> ModelRegistry:
        return cls(settings, metrics)

    # --- routing ------------------------------------------------------------------------------------

    @property
    def schedulers(self) -> dict[str, ContinuousScheduler]:
        """The serving scheduler of every generation model, by name."""
        return {n: e for n, e in self._serving() if isinstance(e, ContinuousScheduler)}

    @property
    def batchers(self) -> dict[str, RequestBatcher]:
        """The serving batcher of every prediction model, by name."""
        return {n: e for n, e in self._serving() if isinstance(e, RequestBatcher)}

    def needs_client(self) -> bool:
        """Whether routing depends on the client (some model has an A/B split)."""
        return bool(self.settings.traffic)

    def batcher(self, name: str | None, client: str = "") -> RequestBatcher:
        fast = self._plain.get(("prediction", name))
        if fast is not None:
            assert isinstance(fast, RequestBatcher)
            return fast
        if name is None:  # the first prediction model listed
            name = next((m.name for m in self.settings.models if isinstance(m, EchoModelSpec)), None)
            if name is None:
                self._missing("prediction", name)
        engine = self._route(name, client, "prediction")
        assert isinstance(engine, RequestBatcher)
        return engine

    def scheduler(self, name: str | None, client: str = "") -> ContinuousScheduler:
        fast = self._plain.get(("generation", name))
        if fast is not None:
            assert isinstance(fast, ContinuousScheduler)
            return fast
        engine = self._route(name or self.default_generator, client, "generation")
        assert isinstance(engine, ContinuousScheduler)
        return engine

    def _route(self, ref: str, client: str, kind: Kind) -> Engine:
        name, _, version = ref.partition("@")
        entry = self.entries.get(name)
        if entry is None:
            if any(spec.name == name for spec in self.settings.models):
                self.metrics.rejections.child("model_loading").inc()
                raise Overloaded(f"model {name!r} is still loading", reason="model_loading")
            self._missing(kind, ref)
        if entry.kind != kind:
            if kind == "prediction":
                raise InvalidRequest(
                    f"model {name!r} generates tokens; use /v1/stream or /v1/completions", field="model"
                )
            raise InvalidRequest(f"model {name!r} is a prediction model; use /predict", field="model")
        ready = entry.ready()
        if not ready:
            reason = "draining" if not self._accepting else "model_loading"
            self.metrics.rejections.child(reason).inc()
            raise Overloaded(f"model {name!r} has no version ready yet", reason=reason)
        if version == LATEST:
            return max(ready, key=lambda d: d.loaded_order).engine
        if version:
            found = entry.versions.get(version)
            if found is None or found.state is not ModelState.READY:
                have = sorted(d.version for d in ready)
                raise UnknownModel(f"model {name!r} has no ready version {version!r}; ready: {have}", field="model")
            return found.engine
        if entry.split:
            picked = self._split(entry, ready, client)
            if picked is not None:
                return picked.engine
        serving = entry.versions.get(entry.serving or "")
        if serving is None or serving.state is not ModelState.READY:
            serving = max(ready, key=lambda d: d.loaded_order)
        return serving.engine

    @staticmethod
    def _split(entry: ModelEntry, ready: list[Deployment], client: str) -> Deployment | None:
        weighted = [(d, entry.split.get(d.version, 0.0)) for d in sorted(ready, key=lambda d: d.version)]
        total = sum(w for _, w in weighted)
        if total <= 0:
            return None
        point = ab_fraction(entry.name, client) * total
        for deployment, weight in weighted:
            point -= weight
            if point < 0:
                return deployment
        return weighted[-1][0]

    def _refresh(self) -> None:
        """Rebuild the plain-name routes after a version changed state."""
        plain: dict[tuple[Kind, str | None], Engine] = {}
        for entry in self.entries.values():
            serving = entry.versions.get(entry.serving or "")
            if entry.split or serving is None or serving.state is not ModelState.READY:
                continue  # routed the slow way: by client, or to a loading or draining model
            plain[(entry.kind, entry.name)] = serving.engine
        first_prediction = next((e.name for e in self.entries.values() if e.kind == "prediction"), None)
        defaults: list[tuple[Kind, str | None]] = [
            ("prediction", first_prediction),
            ("generation", self.default_generator),
        ]
        for kind, default in defaults:
            engine = plain.get((kind, default))
            if engine is not None:
                plain[(kind, None)] = engine
        self._plain = plain

    def _missing(self, kind: Kind, name: str | None) -> NoReturn:
        have = sorted(e.name for e in self.entries.values() if e.kind == kind)
        raise UnknownModel(f"no {kind} model named {name!r}; this server has {have}", field="model")

    def names(self) -> list[tuple[str, str, str]]:
        """(name, serving version, kind) of every model with a version ready."""
        return [
            (n, e.model.version, "prediction" if isinstance(e, RequestBatcher) else "generation")
            for n, e in self._serving()
        ]

    def _serving(self) -> Iterator[tuple[str, Engine]]:
        for entry in self.entries.values():
            serving = entry.versions.get(entry.serving or "")
            if serving is not None:
                yield entry.name, serving.engine

    def deployments(self) -> Iterator[Deployment]:
        for entry in self.entries.values():
            yield from entry.versions.values()

    def engines(self) -> list[tuple[str, Engine]]:
        """(name, engine) of every running engine, draining ones included."""
        return [(e.name, d.engine) for e in self.entries.values() for d in e.versions.values() if d.scope is not None]

    def describe(self) -> list[dict[str, object]]:
        """Every model, its versions and their states (``GET /admin/models``)."""
        rows: list[dict[str, object]] = []
        for entry in self.entries.values():
            ready = entry.ready()
            rows.append({
                "name": entry.name,
                "kind": entry.kind,
                "serving": entry.serving,
                "latest": max(ready, key=lambda d: d.loaded_order).version if ready else None,
                "split": entry.split,
                "versions": [d.describe() for d in entry.versions.values()],
                "failed_loads": [d.describe() for d in entry.failures],
            })  # fmt: skip
        return rows

    # --- lifecycle ----------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load and warm every configured model, report started, then run their engines until cancelled.

        Raises:
            ModelLoadError: a configured model failed to load at startup.
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for spec in self.settings.models:
                deployment = await self._load(spec)
                if deployment.state is ModelState.FAILED:
                    raise ModelLoadError(f"model {spec.name!r} version {spec.version!r}: {deployment.error}")
            task_status.started()

    def load(self, spec: ModelSpec) -> Deployment:
        """Start loading ``spec`` in the background; it serves once warm (see the module docstring).

        Raises:
            Conflict: that version is already loaded or loading.
            InvalidRequest: ``spec`` has another kind than the model's other versions.
            Overloaded: the server is starting or draining.
        """
        if self._tg is None or not self._accepting:
            raise Overloaded("the server is not running", reason="draining" if not self._accepting else "model_loading")
        entry = self.entries.get(spec.name)
        kind: Kind = "prediction" if isinstance(spec, EchoModelSpec) else "generation"
        if entry is not None and entry.kind != kind:
            raise InvalidRequest(f"model {spec.name!r} is a {entry.kind} model; cannot load a {kind} version")
        if entry is not None and spec.version in entry.versions:
            state = entry.versions[spec.version].state.value
            raise Conflict(f"model {spec.name!r} version {spec.version!r} is already {state}", field="version")
        deployment = self._add(spec)
        self._tg.start_soon(self._load_added, deployment)
        return deployment

    def reload(self, settings: ServerSettings) -> list[Deployment]:
        """Load every version listed in ``settings`` that is not loaded yet (SIGHUP); each is hot-swapped
        in as it becomes ready. Versions no longer listed keep running; unload them explicitly."""
        started = []
        for spec in settings.models:
            entry = self.entries.get(spec.name)
            if entry is None or spec.version not in entry.versions:
                try:
                    started.append(self.load(spec))
                except (Conflict, InvalidRequest, Overloaded) as exc:
                    log.warning("reload: skipping model %r version %r: %s", spec.name, spec.version, exc)
        return started

    def unload(self, name: str, version: str) -> Deployment:
        """Stop routing to a version and stop it once it finished what it holds.

        Raises:
            UnknownModel: no such model or version.
            Conflict: it is the model's only ready version.
        """
        entry = self.entries.get(name)
        found = entry.versions.get(version) if entry is not None else None
        if entry is None or found is None:
            raise UnknownModel(f"no loaded model {name!r} version {version!r}", field="version")
        others = [d for d in entry.ready() if d is not found]
        if found.state is ModelState.READY and not others:
            raise Conflict(f"{name!r} version {version!r} is the only ready version; load another first")
        if entry.serving == version:
            entry.serving = max(others, key=lambda d: d.loaded_order).version
            self.metrics.model_swaps.child(name).inc()
        self._retire(found)
        self._refresh()
        return found

    def _add(self, spec: ModelSpec) -> Deployment:
        kind: Kind = "prediction" if isinstance(spec, EchoModelSpec) else "generation"
        entry = self.entries.setdefault(spec.name, ModelEntry(spec.name, kind))
        entry.split = dict(self.settings.traffic.get(spec.name, {}))
        deployment = Deployment(spec, make_engine(spec, self.settings, self.metrics))
        entry.versions[spec.version] = deployment
        return deployment

    async def _load(self, spec: ModelSpec) -> Deployment:
        deployment = self._add(spec)
        await self._load_added(deployment, replace=False)  # at startup every listed version stays loaded
        return deployment

    async def _load_added(self, deployment: Deployment, *, replace: bool = True) -> None:
        spec = deployment.spec
        entry = self.entries[spec.name]
        try:
            await _warm_up(deployment)
        except ModelLoadError as exc:
            deployment.state = ModelState.FAILED
            deployment.error = str(exc)
            del entry.versions[spec.version]
            self._refresh()
            entry.failures = [*entry.failures[-4:], deployment]
            self.metrics.model_loads.child(spec.name, "failed").inc()
            log.warning("loading model %r version %r failed: %s", spec.name, spec.version, exc)
            return
        assert self._tg is not None
        await self._tg.start(self._run_engine, deployment)
        self._loads += 1
        deployment.loaded_order = self._loads
        deployment.state = ModelState.READY
        self.metrics.model_loads.child(spec.name, "ok").inc()
        previous = entry.serving
        entry.serving = spec.version
        if previous is not None and previous != spec.version:
            self.metrics.model_swaps.child(spec.name).inc()
            old = entry.versions.get(previous)
            if replace and old is not None and not entry.split.get(previous):
                self._retire(old)  # an A/B arm stays loaded; a replaced version drains
        self._refresh()

    async def _run_engine(
        self, deployment: Deployment, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            deployment.scope = scope
            task_status.started()
            await deployment.engine.run()
        deployment.scope = None

    def _retire(self, deployment: Deployment) -> None:
        deployment.state = ModelState.DRAINING
        deployment.engine.stop_accepting()
        assert self._tg is not None
        self._tg.start_soon(self._drain, deployment)

    async def _drain(self, deployment: Deployment) -> None:
        # Bounded: every sequence ends by a time limit or a shutdown. A poll, as engines signal no idleness.
        while not deployment.engine.idle:  # noqa: ASYNC110 - see above
            await anyio.sleep(_DRAIN_POLL_S)
        if deployment.scope is not None:
            deployment.scope.cancel()
        entry = self.entries[deployment.spec.name]
        if entry.versions.get(deployment.version) is deployment:
            del entry.versions[deployment.version]
        self._refresh()

    def stop_accepting(self) -> None:
        self._accepting = False
        for _, engine in self.engines():
            engine.stop_accepting()

    def abort_all(self) -> None:
        for _, engine in self.engines():
            if isinstance(engine, ContinuousScheduler):
                engine.abort_all()


async def _warm_up(deployment: Deployment) -> None:
    """Load (``load_ms``, or the injected failure), then one dummy inference before serving."""
    spec = deployment.spec
    if spec.load_ms > 0:
        await anyio.sleep(spec.load_ms / 1000)
    if spec.fail_load:
        raise ModelLoadError("the load failed (fail_load is set: injected fault)")
    try:
        engine = deployment.engine
        if isinstance(engine, RequestBatcher):
            engine.model.predict_batch(["warm up"])
            cost = engine.model.batch_cost_s(1)
        else:
            plan = engine.model.plan("warm up", 1, 0)
            engine.model.next_token(plan)
            cost = engine.model.prefill_cost_s(plan.prompt_tokens) + engine.model.step_cost_s(1)
    except Exception as exc:  # a model that cannot run its dummy inference must not serve
        raise ModelLoadError(f"the warm-up inference failed: {exc}") from exc
    if cost > 0:
        await anyio.sleep(cost)
