"""Operations routes: liveness, readiness, Prometheus metrics and a JSON view of the same."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from reference_server.endpoints.common import JSONResponse, state_of
from reference_server.openapi import openapi_document

OPENAPI = openapi_document()  # built once: it depends on the request models only

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


async def readyz(request: Request) -> Response:
    state = state_of(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    state = state_of(request)
    return Response(state.render_metrics(), media_type=PROMETHEUS_TEXT)


async def stats(request: Request) -> Response:
    state = state_of(request)
    registry = state.registry
    return JSONResponse(
        {
            "models": [{"name": n, "version": v, "kind": k} for n, v, k in registry.names()],
            "queues": {
                **{n: {"kind": "predict", "depth": b.depth} for n, b in registry.batchers.items()},
                **{
                    n: {"kind": "generate", "waiting": s.waiting, "running": s.running, "steps": s.steps}
                    for n, s in registry.schedulers.items()
                },
            },
            "models_detail": registry.describe(),
            "admission": {k[0]: v for k, v in state.admission.gauges().items()},
            "resumable_streams": len(state.resumes),
            "queue": None if state.queue is None else state.queue.describe(),
            "settings": state.settings.public(),
            "metrics": state.metrics.snapshot(),
        }
    )
