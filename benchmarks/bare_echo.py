"""The floor to compare the reference server against: a bare Starlette app answering ``POST /predict``.

It reads the JSON body with orjson and answers it back as ``{"output": <input>}``: no validation, no
batcher, no metrics. It runs on the same uvicorn settings as the reference server (uvloop, httptools,
no access log, no ``Server`` header), so the gap between the two is the cost of the server's own code.

    .venv/bin/python benchmarks/bare_echo.py --port 8001

``GET /healthz`` exists only so a benchmark can poll for readiness.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class _OrjsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def predict(request: Request) -> Response:
    body = orjson.loads(await request.body())
    return _OrjsonResponse({"output": body.get("input")})


async def healthz(request: Request) -> Response:
    return _OrjsonResponse({"status": "ok"})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
