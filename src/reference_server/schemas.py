"""Request bodies of every route, validated by pydantic (in Rust) with the failing field located.

Native routes forbid unknown fields, so a typo is a 400 rather than a silently ignored setting. OpenAI
routes ignore unknown fields, because real OpenAI clients send many we do not use (temperature, top_p…).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

_STRICT = ConfigDict(extra="forbid", frozen=True)
_OPENAI = ConfigDict(extra="ignore", frozen=True)

ModelName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
REQUEST_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
PredictInput = str | float | list[float] | list[str] | dict[str, Any]


class PredictRequest(BaseModel):
    model_config = _STRICT
    input: PredictInput
    model: ModelName | None = None


class PredictBatchRequest(BaseModel):
    model_config = _STRICT
    inputs: list[PredictInput] = Field(min_length=1, max_length=4096)
    model: ModelName | None = None


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/stream``."""

    model_config = _STRICT
    prompt: str = Field(max_length=1_000_000)
    max_tokens: int | None = Field(None, ge=1)
    model: ModelName | None = None
    seed: int | None = None
    request_id: RequestId | None = None


# --- WebSocket messages (docs/protocol.md) -------------------------------------------------------


class WsGenerate(GenerateRequest):
    type: Literal["generate"]
    id: RequestId


class WsPredict(PredictRequest):
    type: Literal["predict"]
    id: RequestId


class WsCancel(BaseModel):
    model_config = _STRICT
    type: Literal["cancel"]
    id: RequestId


class WsPing(BaseModel):
    model_config = _STRICT
    type: Literal["ping"]
    data: str | None = Field(None, max_length=256)


class WsPong(BaseModel):
    """The client's answer to the server's application-level ``ping``."""

    model_config = _STRICT
    type: Literal["pong"]
    data: str | None = Field(None, max_length=256)


class WsResume(BaseModel):
    """Reattach to generation ``id`` (started on an earlier socket) after position ``last_seq``."""

    model_config = _STRICT
    type: Literal["resume"]
    id: RequestId
    last_seq: int = Field(-1, ge=-1)


WsAny = WsGenerate | WsPredict | WsCancel | WsPing | WsPong | WsResume
WsMessage = Annotated[WsAny, Field(discriminator="type")]
WS_TYPES = ("generate", "predict", "cancel", "ping", "pong", "resume")


# --- admin ------------------------------------------------------------------------------------------


class AnyObject(BaseModel):
    """Any JSON object; its fields land in ``model_extra`` (validated later, e.g. as a model spec)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class UnloadRequest(BaseModel):
    model_config = _STRICT
    version: str = Field(min_length=1, max_length=64)


# --- OpenAI-compatible -----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = _OPENAI
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = _OPENAI
    model: ModelName
    prompt: str | list[str] = Field(max_length=1_000_000)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for legacy completions
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)


class ChatMessage(BaseModel):
    model_config = _OPENAI
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return " ".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(BaseModel):
    model_config = _OPENAI
    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
