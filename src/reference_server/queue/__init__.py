"""Queue mode: the front end enqueues generation jobs; worker processes produce their results."""

from reference_server.queue.backend import JobQueue
from reference_server.queue.jobs import BadJob, Chunk, Job, StepWrites
from reference_server.queue.memory import MemoryQueue
from reference_server.queue.redis_streams import GROUP, QueueCounters, RedisStreams, connect
from reference_server.queue.worker import JobBucket, TokenSource, Worker

__all__ = [
    "GROUP",
    "BadJob",
    "Chunk",
    "Job",
    "JobBucket",
    "JobQueue",
    "MemoryQueue",
    "QueueCounters",
    "RedisStreams",
    "StepWrites",
    "TokenSource",
    "Worker",
    "connect",
]
