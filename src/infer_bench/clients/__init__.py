"""Protocol clients: one per transport, all driven the same way.

A client belongs to one VU and sends one request at a time per lane, built from a prompt; everything
that happens to the request lands on its ``Timeline``, and nothing a peer does raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from infer_bench.clients.requests import Target, request_factory
from infer_bench.clients.vu import HttpClient
from infer_bench.clients.websocket import WebSocketClient
from infer_bench.metrics.timeline import Timeline
from infer_bench.scenario import UserClass, WebSocketRequest


class Client(Protocol):
    async def request(
        self, tl: Timeline, prompt: str, *, timeout_s: float, cancel_after_tokens: int | None = None,
        read_delay_s: float = 0.0, reconnect: bool = False,
    ) -> None: ...  # fmt: skip

    def close(self) -> None: ...


def client_maker(
    user_class: UserClass, target: Target, clock: Callable[[], int] = time.perf_counter_ns
) -> Callable[[], Client]:
    """A factory of one class's clients (one per VU)."""
    request = user_class.request
    if isinstance(request, WebSocketRequest):
        return lambda: WebSocketClient(target, request, clock)
    factory = request_factory(user_class, target)
    return lambda: HttpClient(target, factory, clock)


def lanes(user_class: UserClass) -> int:
    """Requests one VU keeps in flight at once: ``in_flight`` on a WebSocket, else one."""
    request = user_class.request
    return request.in_flight if isinstance(request, WebSocketRequest) else 1


__all__ = ["Client", "Target", "client_maker", "lanes"]
