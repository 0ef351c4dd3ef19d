"""``infer-bench probe``: one streaming request, shown token by token, with its timings.

A quick check that a target is up and speaks the protocol, before a load test. One request measures
nothing statistically; ``infer-bench run`` is for that. The stream is read with httpx, which is fine for
one request (MEASUREMENTS.md: httpx is only a problem under concurrency); the bytes are decoded by ``wire``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson

from infer_bench.errors import RunAborted, TargetUnreachable, UsageError
from infer_bench.wire import ProtocolError
from infer_bench.wire.openai import parse_openai_data
from infer_bench.wire.sse import SSEDecoder, SSEEvent

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass
class ProbeResult:
    url: str
    status: int
    tokens: list[str] = field(default_factory=list)
    ttft_s: float | None = None
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    finish: str = ""


def probe(
    base_url: str, *, protocol: str, prompt: str, max_tokens: int, model: str, on_token: Callable[[str], None]
) -> ProbeResult:
    """Stream one request from ``base_url`` and time it.

    Raises:
        TargetUnreachable: nothing answers at ``base_url``.
        RunAborted: the target answered with an error status.
    """
    if protocol == "sse":
        path, body = "/v1/stream", {"prompt": prompt, "max_tokens": max_tokens}
    elif protocol == "openai":
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True}  # fmt: skip
    else:
        raise UsageError(f"--protocol: expected sse or openai, got {protocol!r}")
    url = base_url.rstrip("/") + path
    result = ProbeResult(url=url, status=0)
    # httpx writes headers and body separately; without TCP_NODELAY, Nagle's algorithm and the
    # server's delayed ACK add ~40 ms to the first token (measured here).
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), transport=transport) as client:
            start = last = time.perf_counter()  # after the client is built: its TLS setup is not the target's
            with client.stream("POST", url, json=body) as r:
                result.status = r.status_code
                if r.status_code >= 400:
                    r.read()
                    raise RunAborted(f"{url} answered {r.status_code}: {r.text[:300]}")
                decoder = SSEDecoder()
                for chunk in r.iter_bytes():
                    now = time.perf_counter()
                    for event in decoder.feed(chunk):
                        text = _token_text(protocol, event, result)
                        if not text:
                            continue
                        if result.ttft_s is None:
                            result.ttft_s = now - start
                        else:
                            result.gaps_s.append(now - last)
                        last = now
                        result.tokens.append(text)
                        on_token(text)
    except httpx.ConnectError as exc:
        raise TargetUnreachable(f"cannot connect to {url}: {exc}") from None
    except httpx.HTTPError as exc:
        raise RunAborted(f"{url}: the stream failed: {exc}") from None
    result.e2e_s = time.perf_counter() - start
    return result


def _token_text(protocol: str, event: SSEEvent, result: ProbeResult) -> str:
    """The token an event carries ("" for none); records how the stream finished on ``result``.

    Raises:
        RunAborted: the target broke the protocol.
    """
    try:
        if protocol == "sse":
            if event.event == "token":
                return str(orjson.loads(event.data)["token"])
            if event.event in ("done", "error"):
                payload = orjson.loads(event.data)
                result.finish = str(payload.get("finish_reason") or payload.get("error"))
            return ""
        delta = parse_openai_data(event.data)
    except (orjson.JSONDecodeError, KeyError, TypeError, ProtocolError) as exc:
        raise RunAborted(f"{result.url}: not the expected stream: {exc}") from None
    if delta.finish_reason or delta.error:
        result.finish = str(delta.finish_reason or delta.error)
    return delta.text
