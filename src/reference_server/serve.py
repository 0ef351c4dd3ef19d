"""Running the reference server on uvicorn: uvloop, httptools, and the sans-I/O WebSocket protocol.

Those three choices are measured (MEASUREMENTS.md): uvloop + httptools serve 2.5x the requests of plain
asyncio + h11 on one core, and ``websockets-sansio`` moves 1.55x the WebSocket messages.

Shutdown: on SIGINT/SIGTERM readiness turns red and new generation requests are refused at once, while
uvicorn stops accepting connections and lets in-flight streams finish for ``graceful_shutdown_s``; what
is left then is ended with an in-band ``shutdown`` error rather than cut off, and WebSockets are closed
with 1001 (going away).

SIGHUP re-reads the settings file and hot-swaps in every model version it lists that is not loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.supervisors import Multiprocess

from reference_server.app import create_app
from reference_server.connections import ReferenceConfig, ReferenceHttpProtocol, ReferenceWebSocketProtocol
from reference_server.endpoints.common import ServerState
from reference_server.errors import ConfigError
from reference_server.settings import ServerSettings, load_settings

SETTINGS_ENV = "INFERBENCH_SERVER_SETTINGS"

log = logging.getLogger("reference_server")

Announce = Callable[[str], None]


def app_from_env() -> Starlette:
    """App factory for ``--workers N``: each worker process rebuilds the app from the parent's settings."""
    app = create_app(ServerSettings.model_validate_json(os.environ[SETTINGS_ENV]))
    tune_gc()
    return app


def tune_gc() -> None:
    """Keep the garbage collector off the request path of a long-running server process.

    Profiled here: each batch of suspended requests pushed gen0 past its threshold of 700, ~5,600
    collections per 12 s, and the full collections rescanned the ~48k objects loaded at startup for
    up to 41 ms each — that was the p99. Freezing the startup objects and raising the gen0 threshold
    cut collection time from ~1.9 s to ~5 ms per run and p99 from ~26 ms to ~6 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def uvicorn_config(settings: ServerSettings, app: Starlette | None = None) -> uvicorn.Config:
    logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)
    fast = importlib.util.find_spec("uvloop") is not None
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop" if fast else "asyncio",
        "log_level": settings.log_level,
        "access_log": False,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
        # A hard transport cap well above the app's own limit, so an oversize message gets an in-band
        # error and the socket stays open; only a flood beyond this closes it (1009).
        "ws_max_size": max(16 << 20, 4 * settings.max_body_bytes),
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_timeout_s,
        "lifespan": "on",
        "server_header": False,
    }
    common.update(
        http=ReferenceHttpProtocol,
        ws=ReferenceWebSocketProtocol,
        max_connections_per_client=settings.max_connections_per_client,
        request_read_timeout_s=settings.request_read_timeout_s,
    )
    if settings.workers > 1:
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        return ReferenceConfig("reference_server.serve:app_from_env", factory=True, workers=settings.workers, **common)
    return ReferenceConfig(app or create_app(settings), **common)


class ReferenceServer(uvicorn.Server):
    """uvicorn's server with readiness turned red as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, announce: Announce | None = None) -> None:
        super().__init__(config)
        self._announce = announce
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self._announce is not None and self.started:
            self._announce(self.url)

    @property
    def url(self) -> str:
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                return f"http://{host}:{port}"
        return f"http://{self.config.host}:{self.config.port}"

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        reload_installed = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        previous = signal.signal(signal.SIGHUP, self.handle_reload) if reload_installed else None
        try:
            with super().capture_signals():
                yield
                # uvicorn re-raises the captured SIGTERM after shutting down, so the process dies by the
                # signal (exit -15). Our shutdown drained cleanly: exit 0 instead.
                self._captured_signals.clear()
        finally:
            if reload_installed:
                signal.signal(signal.SIGHUP, previous)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn closes every WebSocket with 1012 the moment shutdown starts, which would cut their
        # streams off with no grace period. Keep them out of that sweep: their tasks still count as
        # running, so uvicorn waits for them, and each session closes itself (1001) once its streams
        # have ended — finished, or ended in-band by ``_abort_streams`` at the end of the grace period.
        websockets = [c for c in self.server_state.connections if isinstance(c, WebSocketsSansIOProtocol)]
        for connection in websockets:
            self.server_state.connections.discard(connection)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.loaded_app if self.config.loaded else None
        state = _state_of(app)
        if state is not None and not state.draining:
            state.draining = True
            state.ready = False
            state.registry.stop_accepting()
            if self._loop is not None:
                # uvicorn cancels still-running responses when the grace period ends, before the lifespan
                # shutdown; end the streams just before that, so clients get an in-band reason.
                delay = max(0.0, self.config.timeout_graceful_shutdown or 0.0) * 0.9
                loop = self._loop
                loop.call_soon_threadsafe(_in_task, loop, _drain_websockets, state)
                loop.call_soon_threadsafe(loop.call_later, delay, _in_task, loop, _abort_streams, state)
        super().handle_exit(sig, frame)

    def handle_reload(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.loaded_app if self.config.loaded else None
        state = _state_of(app)
        if state is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(reload_models(state), self._loop)


def _in_task(
    loop: asyncio.AbstractEventLoop, work: Callable[[ServerState], Coroutine[Any, Any, None]], state: ServerState
) -> None:
    # anyio needs a running task to spawn into task groups; a bare loop callback is not one.
    loop.create_task(work(state))


async def reload_models(state: ServerState) -> None:
    """Re-read the settings file and load the versions it adds (SIGHUP); failures are logged, not fatal."""
    source = state.settings.source
    if source is None:
        log.warning("SIGHUP: the server was not started from a settings file; nothing to reload")
        return
    try:
        settings = load_settings(source)
    except ConfigError as exc:
        log.warning("SIGHUP: keeping the running models: %s", exc)
        return
    for deployment in state.registry.reload(settings):
        log.warning("SIGHUP: loading model %r version %r", deployment.spec.name, deployment.version)


async def _drain_websockets(state: ServerState) -> None:
    """Each WebSocket closes with 1001 once its streams have ended (idle ones at once)."""
    for session in list(state.closers):
        session.tg.start_soon(session.drain)


async def _abort_streams(state: ServerState) -> None:
    """The grace period is over: end every stream still running with an in-band ``shutdown``."""
    state.registry.abort_all()
    if state.queue is not None:
        state.queue.stopping = True  # queued streams end in-band at their next read (their jobs go on)


class _QuietDrops(logging.Filter):
    """uvicorn logs an error when a response ends unfinished; for a dropped slow consumer that is the
    intent (an unfinished response is how the connection gets closed), and it is counted instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


def _state_of(app: object) -> ServerState | None:
    # uvicorn wraps the app in middleware; walk down to the Starlette app that holds our state.
    for _ in range(8):
        state = getattr(getattr(app, "state", None), "server", None)
        if isinstance(state, ServerState):
            return state
        app = getattr(app, "app", None)
    return None


_QUIET_DROPS = _QuietDrops()


def bind(host: str, port: int, *, send_buffer_bytes: int | None = None) -> socket.socket:
    """A listening socket, bound here so that a taken port is our error to report, not uvicorn's exit.

    ``send_buffer_bytes`` fixes the kernel send buffer of every connection it accepts (Linux copies it
    from the listening socket). Left to autotuning, one slow reader can park up to ``tcp_wmem``'s maximum
    (4 MB here) in the kernel before the server's own stream buffer notices it is behind.

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)  # worker processes serve the same socket
    return sock


def run(settings: ServerSettings, announce: Announce | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Blocks. ``announce`` receives the URL once listening.

    Raises:
        OSError: the address cannot be bound.
    """
    config = uvicorn_config(settings)
    sock = bind(settings.host, settings.port, send_buffer_bytes=settings.send_buffer_bytes)
    tune_gc()
    if settings.workers > 1:
        host, port = sock.getsockname()[:2]
        if announce is not None:
            announce(f"http://{host}:{port}")
        Multiprocess(config, sockets=[sock]).run()  # uvicorn's supervisor restarts dead workers
        return
    ReferenceServer(config, announce).run(sockets=[sock])


class EmbeddedServer:
    """A real uvicorn serving the reference app on a free loopback port, in a background thread.

    For tests and for runs against the embedded default: ``with EmbeddedServer(settings) as server:``
    gives ``server.url`` once the server answers, and stops it (gracefully) on exit.
    """

    def __init__(self, settings: ServerSettings | None = None, *, startup_timeout_s: float = 10.0) -> None:
        self.settings = (settings or ServerSettings()).model_copy(update={"port": 0, "workers": 1})
        self.app = create_app(self.settings)
        self._server = ReferenceServer(uvicorn_config(self.settings, self.app))
        self._socket = bind(self.settings.host, 0, send_buffer_bytes=self.settings.send_buffer_bytes)
        # uvicorn installs no signal handlers off the main thread, so the caller's Ctrl-C stays its own.
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="reference-server", daemon=True
        )
        self._startup_timeout_s = startup_timeout_s
        self.url = ""

    @property
    def state(self) -> ServerState:
        state: ServerState = self.app.state.server
        return state

    def start(self) -> EmbeddedServer:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not (self._server.started and self.state.ready):  # poll readiness, never a fixed sleep
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the embedded reference server did not start")
            time.sleep(0.005)
        self.url = self._server.url
        return self

    def stop(self) -> None:
        """Shut down as on SIGTERM: refuse new work, let streams finish within the grace period."""
        self._server.handle_exit(signal.SIGTERM, None)
        self._thread.join(timeout=self.settings.graceful_shutdown_s + 5)
        self._socket.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
