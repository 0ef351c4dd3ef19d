"""Server settings: defaults, a ``server.yaml`` file, and flags on top (flags win).

The simulated models' cost defaults imitate a memory-bound accelerator, where one decode step costs
about the same for one sequence as for sixty-four: ``step = base + per_seq × n`` with a large base and a
small per-sequence term. That is what makes batching visible; with a zero cost a batcher can only add
overhead (MEASUREMENTS.md: a naive batcher in front of a zero-cost model halved JSON throughput).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError

from reference_server.errors import ConfigError

_FROZEN = ConfigDict(frozen=True, extra="forbid")
ADMIN_TOKEN_ENV = "INFERBENCH_ADMIN_TOKEN"


class EchoModelSpec(BaseModel):
    """A prediction model that returns its input; a batch costs ``base_ms + per_item_ms × size``."""

    model_config = _FROZEN
    kind: Literal["echo"] = "echo"
    name: str = Field("echo", min_length=1, max_length=128)
    version: str = Field("1", min_length=1, max_length=64)
    base_ms: float = Field(0.5, ge=0, le=60_000)
    per_item_ms: float = Field(0.01, ge=0, le=60_000)
    load_ms: float = Field(0.0, ge=0, le=600_000, description="simulated load time before warm-up")
    fail_load: bool = Field(False, description="fault injection: loading this version fails")


class OutputLength(BaseModel):
    """Output length when a request sets no ``max_tokens``: uniform between min and max, inclusive."""

    model_config = _FROZEN
    min: int = Field(16, ge=1)
    max: int = Field(128, ge=1)


class TokensModelSpec(BaseModel):
    """An LLM-like generator: words from a built-in vocabulary, deterministic under ``seed``.

    Costs: a decode step of ``n`` running sequences takes ``base_ms + per_seq_ms × n``; a sequence
    joining a step adds its prefill, ``prefill_ms + per_input_token_ms × prompt_tokens``.
    """

    model_config = _FROZEN
    kind: Literal["tokens"] = "tokens"
    name: str = Field("tokens", min_length=1, max_length=128)
    version: str = Field("1", min_length=1, max_length=64)
    seed: int = 0
    base_ms: float = Field(5.0, ge=0, le=60_000)
    per_seq_ms: float = Field(0.1, ge=0, le=60_000)
    prefill_ms: float = Field(1.0, ge=0, le=60_000)
    per_input_token_ms: float = Field(0.01, ge=0, le=60_000)
    output_tokens: OutputLength = OutputLength()
    max_tokens_limit: int = Field(4096, ge=1, le=1_000_000)
    fail_rate: float = Field(0.0, ge=0, le=1)
    """Fraction of requests that fail mid-stream with an in-band ``model_error``."""
    stall_rate: float = Field(0.0, ge=0, le=1)
    """Fraction of requests that stop producing tokens mid-stream for ``stall_ms``."""
    stall_ms: float = Field(30_000.0, ge=0)
    load_ms: float = Field(0.0, ge=0, le=600_000, description="simulated load time before warm-up")
    fail_load: bool = Field(False, description="fault injection: loading this version fails")


ModelSpec = Annotated[EchoModelSpec | TokensModelSpec, Field(discriminator="kind")]


def _default_models() -> list[EchoModelSpec | TokensModelSpec]:
    return [EchoModelSpec(), TokensModelSpec()]


class ServerSettings(BaseModel):
    """Everything ``infer-bench serve`` can be told; see docs/server.md for each field."""

    model_config = _FROZEN
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    model: str = Field("tokens", description="default model for generation requests that name none")
    models: list[ModelSpec] = Field(default_factory=_default_models, min_length=1)
    batch_size: int = Field(32, ge=1, le=4096)
    batch_timeout_ms: float = Field(
        0.0, ge=0, le=60_000, description="0 = opportunistic: take what queued while the last batch ran"
    )
    max_num_seqs: int = Field(64, ge=1, le=4096)
    max_queue: int = Field(1024, ge=1, le=1_000_000)
    max_body_bytes: int = Field(1 << 20, ge=64)
    heartbeat_s: float = Field(15.0, gt=0)
    sse_retry_ms: int = Field(3000, ge=0)
    stream_buffer: int = Field(4096, ge=1, description="tokens a stream may hold for a slow reader")
    ws_max_in_flight: int = Field(256, ge=1, description="concurrent requests one WebSocket may have")
    graceful_shutdown_s: float = Field(10.0, ge=0)
    metrics: bool = True
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning"

    # Admission (off by default: the load generator measures the server, not its limits).
    rate_limit_per_s: float | None = Field(None, gt=0, description="requests per second per client; None = off")
    rate_limit_burst: float = Field(20.0, ge=1, description="token bucket size: requests a client may send at once")
    max_streams_per_client: int | None = Field(None, ge=1, description="concurrent streams per client; None = off")
    stream_lease_ttl_s: float = Field(3600.0, gt=0, description="a stream lease lapses after this, held or not")
    max_clients_tracked: int = Field(100_000, ge=16, description="token buckets kept before idle ones are dropped")
    max_connections_per_client: int | None = Field(
        None, ge=1, description="open TCP connections per client address (HTTP and WebSocket); None = off"
    )

    # Time limits of a stream (None = no limit); the sweeper checks them every sweep_interval_s.
    first_token_timeout_s: float | None = Field(120.0, gt=0)
    inactivity_timeout_s: float | None = Field(60.0, gt=0)
    total_timeout_s: float | None = Field(1800.0, gt=0)
    sweep_interval_s: float = Field(0.1, gt=0, le=60)

    # Slow consumers and dead peers.
    send_timeout_s: float = Field(10.0, gt=0, description="one write to a client longer than this drops the stream")
    request_read_timeout_s: float | None = Field(
        30.0, gt=0, description="a request (head and body) not read whole by then gets 408; None = wait forever"
    )
    send_buffer_bytes: int | None = Field(
        None, ge=4096, le=64 << 20, description="kernel send buffer per connection (SO_SNDBUF); None = autotuned"
    )
    ws_ping_interval_s: float | None = Field(20.0, gt=0, description="WebSocket protocol pings; None = off")
    ws_ping_timeout_s: float | None = Field(20.0, gt=0, description="no pong within this: the peer is dead")

    # Resume (SSE Last-Event-ID, WebSocket ``resume``).
    resume_buffer: int = Field(256, ge=0, description="recent tokens kept per stream for a resume; 0 = off")
    resume_ttl_s: float = Field(30.0, ge=0, description="how long a dropped stream stays resumable")

    # Models: A/B splits and the admin API.
    traffic: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="model name -> {version: weight}: an A/B split by client id"
    )
    admin_token: SecretStr | None = Field(None, description="bearer token of /admin; None = admin routes off")

    # Generation requests are jobs on a queue: an in-process one by default (its worker is a task of the
    # server), or Redis Streams consumed by `infer-bench worker`s. None: direct mode, the engines in the route.
    queue_url: str | None = Field(
        "memory://",
        pattern=r"^(rediss?|memory)://",
        description="memory:// (in-process, the default), redis://host:port/db, or null for direct mode",
    )
    queue_prefix: str = Field("inferbench", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="key prefix in Redis")
    job_ttl_s: float = Field(600.0, gt=0, le=86_400, description="a queued job not finished by then ends with timeout")
    queue_reclaim_idle_ms: int = Field(
        2000, ge=50, le=3_600_000, description="a job idle this long (its worker died or hung) is reclaimed"
    )
    queue_max_deliveries: int = Field(3, ge=1, le=100, description="deliveries before a job is dead-lettered")
    queue_lease_ttl_s: float = Field(
        30.0, gt=0, le=3600, description="on Redis: a stream lease its front end stopped renewing lapses after this"
    )
    queue_progress_every: int | None = Field(
        None, ge=1, description="jobs publish a progress event every N tokens, a log at start, complete at end"
    )
    queue_cancel_after_s: float | None = Field(
        None, ge=0, le=86_400, description="a job whose reader went away is cancelled after this unless a resume "
        "re-attaches; None = resume_ttl_s",
    )  # fmt: skip

    @property
    def queue_cancel_grace_s(self) -> float:
        """The grace before a queued job whose reader went away is cancelled (``queue_cancel_after_s``)."""
        return self.resume_ttl_s if self.queue_cancel_after_s is None else self.queue_cancel_after_s

    _source: Path | None = PrivateAttr(None)  # the settings file, re-read on SIGHUP

    @property
    def source(self) -> Path | None:
        return self._source

    def model_named(self, name: str) -> EchoModelSpec | TokensModelSpec | None:
        """The last spec named ``name`` (several versions of one model may be listed; the last serves)."""
        return next((m for m in reversed(self.models) if m.name == name), None)

    def public(self) -> dict[str, Any]:
        """The settings as JSON for ``/stats``, secrets masked."""
        data = self.model_dump(mode="json")
        if self.admin_token is not None:
            data["admin_token"] = "***"
        if self.queue_url is not None:  # redis://user:password@host: keep the password off /stats
            data["queue_url"] = re.sub(r"//[^@/]*@", "//***@", self.queue_url)
        return data


def load_settings(path: Path | None = None, **overrides: Any) -> ServerSettings:
    """Settings from defaults, then ``path`` (YAML), then ``overrides`` whose value is not None.

    Raises:
        ConfigError: the file is unreadable or a field is invalid; the message names both.
    """
    data: dict[str, Any] = {}
    source = "settings"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the settings file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "admin_token" not in data and os.environ.get(ADMIN_TOKEN_ENV):
        data["admin_token"] = os.environ[ADMIN_TOKEN_ENV]
    settings = validate_settings(data, source)
    settings._source = path
    return settings


def validate_settings(data: dict[str, Any], source: str = "settings") -> ServerSettings:
    """Settings from a mapping, checked as a whole.

    Raises:
        ConfigError: a field is invalid; the message starts with ``source`` and names the field.
    """
    try:
        settings = ServerSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(source, exc)) from None
    keys = [(m.name, m.version) for m in settings.models]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{source}: models: each name and version must be listed once, got {keys}")
    for name in {m.name for m in settings.models}:
        if len({m.kind for m in settings.models if m.name == name}) > 1:
            raise ConfigError(f"{source}: models: every version of {name!r} must be of one kind")
    for name, split in settings.traffic.items():
        versions = {m.version for m in settings.models if m.name == name}
        unknown = sorted(set(split) - versions)
        if unknown or not split or any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
            raise ConfigError(
                f"{source}: traffic.{name}: expected weights >= 0 (not all 0) for versions {sorted(versions)}, "
                f"got {split}"
            )
    default = settings.model_named(settings.model)
    if default is None or default.kind != "tokens":
        generators = [m.name for m in settings.models if m.kind == "tokens"]
        raise ConfigError(f"{source}: model: expected the name of a tokens model {generators}, got {settings.model!r}")
    return settings


def _describe(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        got = f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{source}: {where}: {err['msg']}{got}")
    return "\n".join(lines)
