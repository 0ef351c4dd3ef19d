"""Queue mode: the front end enqueues generation jobs; worker processes produce their results."""

from reference_server.queue.jobs import BadJob, Chunk, Job
from reference_server.queue.redis_streams import GROUP, QueueCounters, RedisStreams, connect
from reference_server.queue.worker import JobBucket, TokenSource, Worker

__all__ = [
    "GROUP",
    "BadJob",
    "Chunk",
    "Job",
    "JobBucket",
    "QueueCounters",
    "RedisStreams",
    "TokenSource",
    "Worker",
    "connect",
]
