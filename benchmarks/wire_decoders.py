"""How fast the wire decoders run on one core: SSE events/s, OpenAI chunks/s, and the whole HTTP → SSE path.

The client must keep up with ~490k SSE events/s per core (MEASUREMENTS.md), so the decoders get a budget of
well under 2 µs an event. Streams are built in memory and fed in reads of a given size; nothing touches a
socket, so the figures are the decoders' own cost. Best of ``--repeat`` runs (the machine is noisy).

    .venv/bin/python benchmarks/wire_decoders.py            # pin it for steadier figures: taskset -c 1 ...
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from infer_bench.wire.http1 import BodyChunk, ResponseParser
from infer_bench.wire.openai import parse_openai_data
from infer_bench.wire.sse import SSEDecoder

TOKENS_PER_STREAM = 64


def native_stream(request_id: str) -> bytes:
    """One ``/v1/stream`` response body as the reference server frames it (``reference_server.streams``)."""
    events = [b"retry: 1000\n\n"]
    for seq in range(TOKENS_PER_STREAM):
        payload = orjson.dumps({"token": " the", "seq": seq})
        events.append(b"id: %s:%d\nevent: token\ndata: %s\n\n" % (request_id.encode(), seq, payload))
    events.append(b'event: done\ndata: {"finish_reason":"length"}\n\n')
    return b"".join(events)


def openai_chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> bytes:
    delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {"content": text or ""}
    chunk = {
        "id": "chatcmpl-0123456789",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "tokens-64",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return orjson.dumps(chunk)


def openai_stream() -> bytes:
    events = [b"data: " + openai_chunk(None, role=True) + b"\n\n"]
    events += [b"data: " + openai_chunk(" the") + b"\n\n" for _ in range(TOKENS_PER_STREAM)]
    events.append(b"data: " + openai_chunk(None, finish_reason="length") + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def chunked(body_events: bytes) -> list[bytes]:
    """An HTTP/1.1 SSE response with each event in its own HTTP chunk, as Starlette's streaming responses send:
    the head, each chunk, and the last chunk as separate pieces."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    parts = [head]
    for event in body_events.split(b"\n\n")[:-1]:
        piece = event + b"\n\n"
        parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    parts.append(b"0\r\n\r\n")
    return parts


def reads(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def best_rate(run: Callable[[], int], repeat: int) -> float:
    """The highest items/s over ``repeat`` runs of ``run`` (which returns how many items it handled)."""
    best = 0.0
    for _ in range(repeat):
        started = time.perf_counter()
        count = run()
        best = max(best, count / (time.perf_counter() - started))
    return best


def bench_sse(stream: bytes, read_size: int, streams: int, repeat: int) -> float:
    return _bench_sse_reads(reads(stream, read_size), streams, repeat)


def bench_sse_per_event(stream: bytes, streams: int, repeat: int) -> float:
    """Each event its own read: what a client sees when tokens trickle in one at a time."""
    return _bench_sse_reads([event + b"\n\n" for event in stream.split(b"\n\n")[:-1]], streams, repeat)


def _bench_sse_reads(chunks: list[bytes], streams: int, repeat: int) -> float:
    def run() -> int:
        count = 0
        for _ in range(streams):
            decoder = SSEDecoder()
            for chunk in chunks:
                count += len(decoder.feed(chunk))
        return count

    return best_rate(run, repeat)


def bench_openai_parse(count: int, repeat: int) -> float:
    data = openai_chunk(" the").decode()

    def run() -> int:
        for _ in range(count):
            parse_openai_data(data)
        return count

    return best_rate(run, repeat)


def bench_openai_stream(read_size: int, streams: int, repeat: int) -> float:
    chunks = reads(openai_stream(), read_size)

    def run() -> int:
        count = 0
        for _ in range(streams):
            decoder = SSEDecoder()
            for chunk in chunks:
                for event in decoder.feed(chunk):
                    parse_openai_data(event.data)
                    count += 1
        return count

    return best_rate(run, repeat)


def bench_http_sse(read_size: int | None, streams: int, repeat: int) -> float:
    """Chunked HTTP response → body bytes → SSE events, as the client runs it (``None``: one HTTP chunk a read)."""
    pieces = chunked(native_stream("abc"))
    chunks = pieces if read_size is None else reads(b"".join(pieces), read_size)

    def run() -> int:
        count = 0
        for _ in range(streams):
            parser = ResponseParser()
            decoder = SSEDecoder()
            for chunk in chunks:
                for event in parser.feed(chunk):
                    if type(event) is BodyChunk:
                        count += len(decoder.feed(event.data))
        return count

    return best_rate(run, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000, help="streams of 64 tokens per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--read-size", type=int, default=16 * 1024, help="bytes per feed")
    args = parser.parse_args()
    streams, repeat, size = args.streams, args.repeat, args.read_size
    native = native_stream("abc")
    rows = [
        (f"SSE native events, {size} B reads", bench_sse(native, size, streams, repeat)),
        ("SSE native events, one event per read", bench_sse_per_event(native, streams, repeat)),
        (f"HTTP chunked → SSE native events, {size} B reads", bench_http_sse(size, streams, repeat)),
        ("HTTP chunked → SSE native events, one HTTP chunk per read", bench_http_sse(None, streams, repeat)),
        ("OpenAI chunk parse (parse_openai_data alone)", bench_openai_parse(streams * 64, repeat)),
        (f"SSE + OpenAI chunk parse, {size} B reads", bench_openai_stream(size, streams, repeat)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>12,.0f} /s  ({1e6 / rate:.2f} µs each)")


if __name__ == "__main__":
    main()
