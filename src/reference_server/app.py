"""The ASGI application: routes, error handlers, and the lifespan that runs the model schedulers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from reference_server.admission import Admission
from reference_server.batcher import RequestBatcher
from reference_server.endpoints import admin, native, openai, ops, queued, ws
from reference_server.endpoints.common import JSONResponse, ServerState
from reference_server.endpoints.handlers import counted, log
from reference_server.metrics import ServerMetrics, exposition
from reference_server.queue.front import QueueFront, register_queue_gauges
from reference_server.queue.shared_limits import shared_limits_of
from reference_server.queue.worker_main import run_in_process
from reference_server.registry import ModelRegistry
from reference_server.resume import ResumeTable
from reference_server.scheduler import ContinuousScheduler
from reference_server.settings import ServerSettings
from reference_server.sweeper import StreamLimits, Sweeper
from reference_server.watchdog import SendWatchdog


def create_app(settings: ServerSettings | None = None) -> Starlette:
    """Build the reference server for ``settings`` (defaults when None)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    registry = ModelRegistry.from_settings(settings, metrics)
    admission = Admission(
        rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst,
        max_streams=settings.max_streams_per_client, lease_ttl_s=settings.stream_lease_ttl_s,
        max_clients=settings.max_clients_tracked, metrics=metrics, clock=time.monotonic,
    )  # fmt: skip
    resumes = ResumeTable(settings.resume_ttl_s, anyio.current_time)
    watchdog = SendWatchdog(settings.send_timeout_s)
    state = ServerState(settings, registry, metrics, admission, resumes, watchdog, render_metrics=exposition(metrics))
    state.needs_client = admission.limiter is not None or admission.leases is not None or registry.needs_client()
    limits = StreamLimits(settings.first_token_timeout_s, settings.inactivity_timeout_s, settings.total_timeout_s)
    sweeper = Sweeper(registry, admission, resumes, limits, settings.sweep_interval_s, also=[watchdog.sweep])
    _register_gauges(state)
    stream_route = native.stream
    if settings.queue_url is not None:
        state.queue = QueueFront.connect(
            settings.queue_url, settings.queue_prefix, settings.job_ttl_s, keep_s=settings.resume_ttl_s
        )
        register_queue_gauges(metrics, state.queue)
        # On Redis every front end takes its clients' tokens and leases from one place (see admission).
        admission.shared = shared_limits_of(state.queue)
        admission.shared_lease_ttl_s = settings.queue_lease_ttl_s
        state.queue.progress_every = settings.queue_progress_every
        state.queue.max_waiting = settings.max_queue
        state.queue.max_unread = settings.stream_buffer
        state.queue.keep_read = settings.resume_buffer
        stream_route = queued.stream

    routes = [
        Route("/predict", counted("predict", native.predict, metrics), methods=["POST"]),
        Route("/predict/batch", counted("predict_batch", native.predict_batch, metrics), methods=["POST"]),
        Route("/v1/stream", counted("stream", stream_route, metrics), methods=["POST"]),
        Route(
            "/v1/completions",
            counted("completions", openai.completions, metrics, openai.openai_error),
            methods=["POST"],
        ),
        Route(
            "/v1/chat/completions",
            counted("chat_completions", openai.chat_completions, metrics, openai.openai_error),
            methods=["POST"],
        ),
        Route("/v1/models", counted("models", openai.models, metrics), methods=["GET"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/openapi.json", ops.openapi, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/stats", ops.stats, methods=["GET"]),
        Route("/admin/models", counted("admin", admin.list_models, metrics), methods=["GET"]),
        Route("/admin/models/{name}/load", counted("admin", admin.load_model, metrics), methods=["POST"]),
        Route("/admin/models/{name}/unload", counted("admin", admin.unload_model, metrics), methods=["POST"]),
        WebSocketRoute("/ws", ws.websocket_endpoint),
    ]
    if settings.metrics:
        routes.append(Route("/metrics", ops.metrics, methods=["GET"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.run)  # every model loaded and warmed up before readiness
            tg.start_soon(sweeper.run)
            if state.queue is not None:
                await tg.start(state.queue.run)
                if admission.shared is not None:
                    tg.start_soon(admission.keep_shared_leases)
                if state.queue.models is not None:  # the in-process queue: its worker is a task of this process
                    tg.start_soon(run_in_process, settings, state.queue.streams, state.queue.models, metrics)
            state.ready = True
            try:
                yield
            finally:
                state.ready = False
                state.draining = True
                registry.stop_accepting()
                registry.abort_all()
                tg.cancel_scope.cancel()
        if state.queue is not None:
            await state.queue.close()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.server = state
    return app


def _register_gauges(state: ServerState) -> None:
    metrics, registry = state.metrics, state.registry

    def depth() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for name, engine in registry.engines():
            waiting = engine.depth if isinstance(engine, RequestBatcher) else engine.waiting
            out[(name,)] = out.get((name,), 0.0) + waiting
        return out

    def running() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for name, engine in registry.engines():
            if isinstance(engine, ContinuousScheduler):
                out[(name,)] = out.get((name,), 0.0) + engine.running
        return out

    def versions() -> dict[tuple[str, ...], float]:
        return {(d.spec.name, d.version, d.state.value): 1.0 for d in registry.deployments()}

    def admission() -> dict[tuple[str, ...], float]:
        return {**state.admission.gauges(), ("resumable_streams",): float(len(state.resumes))}

    metrics.gauge_callback("queue_depth", "Requests waiting for a batch", ("model",), depth)
    metrics.gauge_callback("running_sequences", "Sequences in the running batch", ("model",), running)
    metrics.gauge_callback("model_versions", "Loaded model versions by state", ("model", "version", "state"), versions)
    metrics.gauge_callback("admission_entries", "Held stream leases, tracked token buckets, resumable streams",
                           ("kind",), admission)  # fmt: skip


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse({"error": code, "message": message}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal", "message": "internal server error"}, status_code=500)
