"""The ASGI application: routes, error handlers, and the lifespan that runs the model schedulers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from reference_server.endpoints import native, openai, ops, ws
from reference_server.endpoints.common import JSONResponse, ServerState
from reference_server.endpoints.handlers import counted, log
from reference_server.metrics import ServerMetrics, exposition
from reference_server.registry import ModelRegistry
from reference_server.settings import ServerSettings


def create_app(settings: ServerSettings | None = None) -> Starlette:
    """Build the reference server for ``settings`` (defaults when None)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    registry = ModelRegistry.from_settings(settings, metrics)
    state = ServerState(settings, registry, metrics, render_metrics=exposition(metrics))
    metrics.gauge_callback(
        "queue_depth", "Requests waiting for a batch", ("model",),
        lambda: {**{(n,): float(b.depth) for n, b in registry.batchers.items()},
                 **{(n,): float(s.waiting) for n, s in registry.schedulers.items()}},
    )  # fmt: skip
    metrics.gauge_callback(
        "running_sequences",
        "Sequences in the running batch",
        ("model",),
        lambda: {(n,): float(s.running) for n, s in registry.schedulers.items()},
    )

    routes = [
        Route("/predict", counted("predict", native.predict, metrics), methods=["POST"]),
        Route("/predict/batch", counted("predict_batch", native.predict_batch, metrics), methods=["POST"]),
        Route("/v1/stream", counted("stream", native.stream, metrics), methods=["POST"]),
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
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/stats", ops.stats, methods=["GET"]),
        WebSocketRoute("/ws", ws.websocket_endpoint),
    ]
    if settings.metrics:
        routes.append(Route("/metrics", ops.metrics, methods=["GET"]))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(registry.run)
            state.ready = True
            try:
                yield
            finally:
                state.ready = False
                state.draining = True
                registry.stop_accepting()
                for scheduler in registry.schedulers.values():
                    scheduler.abort_all()
                tg.cancel_scope.cancel()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.server = state
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse({"error": code, "message": message}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal", "message": "internal server error"}, status_code=500)
