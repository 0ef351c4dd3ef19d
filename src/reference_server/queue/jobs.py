"""Jobs and result chunks as they travel through a queue: flat string fields, decoded strictly.

A job is one generation request; its results are chunks numbered from 0, the last one ``done`` or
``error``. Sequence numbers make processing idempotent: a worker that takes over a job reads how far its
results got and goes on from there, so a client never sees a token twice or misses one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# token, then the job's end (done or error); progress, log and complete are events a long job publishes
# between tokens (what it has done, what happened, that its work is finished), streamed like tokens.
ChunkKind = Literal["token", "done", "error", "progress", "log", "complete"]
_KINDS: dict[str | None, ChunkKind] = {
    "token": "token", "done": "done", "error": "error", "progress": "progress", "log": "log", "complete": "complete",
}  # fmt: skip
EVENT_KINDS = frozenset({"progress", "log", "complete"})


class BadJob(ValueError):
    """A queue entry that is not a job of ours (wrong or missing fields)."""


@dataclass(frozen=True)
class Job:
    id: str
    model: str
    prompt: str
    max_tokens: int | None
    seed: int | None
    deadline: float  # seconds since the epoch; past it the job ends with a timeout
    progress_every: int | None = None  # publish a progress event every this many tokens (and log, complete)

    def fields(self) -> dict[str, str]:
        out = {
            "id": self.id, "model": self.model, "prompt": self.prompt,
            "max_tokens": "" if self.max_tokens is None else str(self.max_tokens),
            "seed": "" if self.seed is None else str(self.seed), "deadline": repr(self.deadline),
        }  # fmt: skip
        if self.progress_every is not None:
            out["progress_every"] = str(self.progress_every)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Job:
        try:
            return cls(
                id=fields["id"], model=fields["model"], prompt=fields["prompt"],
                max_tokens=int(fields["max_tokens"]) if fields["max_tokens"] else None,
                seed=int(fields["seed"]) if fields["seed"] else None, deadline=float(fields["deadline"]),
                progress_every=int(fields["progress_every"]) if fields.get("progress_every") else None,
            )  # fmt: skip
        except (KeyError, ValueError) as exc:
            raise BadJob(f"not a job: {exc!r} in {sorted(fields)}") from None


@dataclass(frozen=True)
class Chunk:
    """One result: tokens are numbered 0, 1, ...; an event or the final chunk carries the number of the
    token that would come next (so the final chunk's ``seq`` is the count of tokens)."""

    seq: int
    kind: ChunkKind
    data: str  # the token text, the finish reason, the error kind (timeout, ...), or an event's JSON
    message: str = ""  # error and log chunks: what happened, for the client
    model_version: str = ""  # final chunks: the version that ran the job
    detail: str = ""  # timeout chunks: which limit passed (first_token, inactivity, total)

    def fields(self) -> dict[str, str]:
        out = {"seq": str(self.seq), "kind": self.kind, "data": self.data}
        if self.message:
            out["message"] = self.message
        if self.model_version:
            out["model_version"] = self.model_version
        if self.detail:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Chunk:
        kind = fields.get("kind")
        if kind not in _KINDS:
            raise BadJob(f"not a result chunk: kind {kind!r}")
        try:
            return cls(
                int(fields["seq"]), _KINDS[kind], fields.get("data", ""),
                fields.get("message", ""), fields.get("model_version", ""), fields.get("detail", ""),
            )  # fmt: skip
        except (KeyError, ValueError) as exc:
            raise BadJob(f"not a result chunk: {exc!r}") from None

    @property
    def final(self) -> bool:
        return self.kind in ("done", "error")

    @property
    def next_seq(self) -> int:
        """The number of the token after this chunk: where a worker taking the job over goes on."""
        return self.seq + 1 if self.kind == "token" else self.seq


@dataclass
class StepWrites:
    """What one worker step sends the queue at once: chunks, then acknowledgements (in that order: a job
    is never acknowledged without its final chunk), and counter increments."""

    chunks: list[tuple[str, Chunk]] = field(default_factory=list)  # (job id, chunk)
    acks: list[tuple[str, int]] = field(default_factory=list)  # (entry id, deliveries it took)
    counts: dict[str, int] = field(default_factory=dict)
    # Job ids still running after this step: the same round trip reads whether any was cancelled.
    watch: list[str] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


# Why a job was cancelled: its client sent ``cancel``, went away and no reader came back in time, its
# stream passed a time limit, or its reader fell too far behind (in-process queue).
CancelCause = Literal["cancel", "abandoned", "timeout", "slow_consumer"]
CANCEL_CAUSES: tuple[CancelCause, ...] = ("cancel", "abandoned", "timeout", "slow_consumer")
_CANCEL_MESSAGES: dict[str, str] = {
    "cancel": "the client cancelled the job",
    "abandoned": "the client went away and no reader came back within the grace period",
    "timeout": "the client's stream passed a time limit",
    "slow_consumer": "the client read too slowly: its unread results passed stream_buffer",
}


def cancelled_end(seq: int, cause: str) -> Chunk:
    """The final chunk of a job stopped by a cancel: a resume reads a clear ``cancelled`` (or
    ``slow_consumer``) end."""
    kind = "slow_consumer" if cause == "slow_consumer" else "cancelled"
    return Chunk(seq, "error", kind, _CANCEL_MESSAGES.get(cause, "the job was cancelled"))


def dead_letter_notice(last: Chunk | None, deliveries: int) -> Chunk | None:
    """The error chunk that tells a dead-lettered job's client, after its ``last`` chunk (None: it ended)."""
    if last is not None and last.final:
        return None
    message = f"the job failed {deliveries} deliveries and was set aside"
    return Chunk(0 if last is None else last.next_seq, "error", "dead_lettered", message)
