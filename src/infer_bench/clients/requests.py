"""Request templates → the bytes of each request, and the exchange that reads its response.

A user class's template is turned into bytes once where it can be (plain HTTP), or per request with a
fresh prompt (SSE, OpenAI): one ``orjson.dumps`` and one join, a few microseconds.
"""

from __future__ import annotations

import itertools
import random
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from infer_bench.clients.exchange import Exchange, HttpExchange, OpenAIExchange, SSEExchange
from infer_bench.errors import UsageError
from infer_bench.scenario import PromptSource, UserClass
from infer_bench.wire.http1 import encode_request, request_with_body
from reference_server.models.vocabulary import WORDS


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    host_header: str
    tls: ssl.SSLContext | None = None  # https / wss: TLS through the event loop

    @property
    def server_hostname(self) -> str | None:
        return self.host if self.tls is not None else None

    @classmethod
    def from_url(cls, url: str, *, verify_tls: bool = True) -> Target:
        """The target of ``url``; with ``verify_tls=False`` (``--insecure``) any certificate is accepted."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "ws", "https", "wss") or not parts.hostname:
            raise UsageError(f"target: expected an http:// or https:// URL with a host, got {url!r}")
        secure = parts.scheme in ("https", "wss")
        port = parts.port or (443 if secure else 80)
        host = parts.hostname
        context = None
        if secure:
            context = ssl.create_default_context()
            if not verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return cls(host, port, f"[{host}]:{port}" if ":" in host else f"{host}:{port}", context)


def prompts(source: PromptSource, rng: random.Random) -> Iterator[str]:
    """Endless prompts: a list in order or at random, or synthetic words (no tokenizer, ever)."""
    if source.kind == "synthetic":
        while True:
            n = rng.randint(source.words_min, source.words_max)
            yield " ".join(rng.choices(WORDS, k=n))
    items = source.prompts
    if source.order == "random":
        while True:
            yield rng.choice(items)
    yield from itertools.cycle(items)


@dataclass(frozen=True)
class RequestFactory:
    """Builds one class's requests for one target."""

    exchange: type[Exchange]
    build: Callable[[str], bytes]  # prompt → request bytes


def fixed_request(user_class: UserClass, target: Target) -> bytes | None:
    """The bytes every request of a plain HTTP class sends (its template has no prompt); None otherwise."""
    if user_class.protocol != "http":
        return None
    return request_factory(user_class, target).build("")


def request_factory(user_class: UserClass, target: Target) -> RequestFactory:
    req: Any = user_class.request
    host = target.host_header
    if user_class.protocol == "http":
        body = orjson.dumps(req.body) if req.body is not None else None
        headers = {"content-type": "application/json", **req.headers} if body else dict(req.headers)
        fixed = encode_request(req.method, host, req.path, headers, body)
        return RequestFactory(HttpExchange, lambda _prompt: fixed)
    if user_class.protocol == "sse":
        headers = {"content-type": "application/json", "accept": "text/event-stream", **req.headers}
        extra = {"max_tokens": req.max_tokens} if req.max_tokens is not None else {}
        base = {**req.body, **extra}

        make = request_with_body("POST", host, req.path, headers)

        def build_sse(prompt: str) -> bytes:
            return make(orjson.dumps({**base, "prompt": prompt}))

        return RequestFactory(SSEExchange, build_sse)
    if user_class.protocol == "openai":
        return _openai_factory(req, host)
    raise UsageError(f"class {user_class.name!r}: no HTTP request template for protocol {user_class.protocol}")


def _openai_factory(req: Any, host: str) -> RequestFactory:
    chat = req.api == "chat"
    path = req.path_prefix.rstrip("/") + ("/chat/completions" if chat else "/completions")
    headers = {"content-type": "application/json", **req.headers}
    if req.api_key:
        headers["authorization"] = f"Bearer {req.api_key}"
    base: dict[str, Any] = {"model": req.model, "max_tokens": req.max_tokens, "stream": req.stream, **req.extra}
    if req.stream and req.include_usage:
        base["stream_options"] = {"include_usage": True}

    make = request_with_body("POST", host, path, headers)

    def build(prompt: str) -> bytes:
        body = {**base, "messages": [{"role": "user", "content": prompt}]} if chat else {**base, "prompt": prompt}
        return make(orjson.dumps(body))

    return RequestFactory(OpenAIExchange if req.stream else HttpExchange, build)
