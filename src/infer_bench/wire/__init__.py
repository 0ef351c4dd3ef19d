"""Byte-level decoders for what streaming inference servers send: no sockets, no clocks, no sleeping.

Each decoder takes bytes (or, for OpenAI chunks, the text of one SSE event) and returns events, so it is
tested with plain bytes and fuzzed cheaply; the clients in ``infer_bench.clients`` own the sockets and stamp
the times.

    infer_bench.wire.http1    HTTP/1.1 responses on httptools (llhttp): heads, body chunks, ends, upgrades
    infer_bench.wire.sse      WHATWG server-sent events: bytes → ``SSEEvent``
    infer_bench.wire.openai   the JSON of one OpenAI streaming chunk → ``OpenAIDelta``

All three raise ``ProtocolError`` when the peer breaks its protocol, and nothing else on any input. The error is
raised by the call that fed the offending bytes (a peer that then goes quiet must not turn it into a timeout),
and it is sticky: a decoder that raised it raises it again on every later call.
"""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(Exception):
    """The peer broke the protocol; the message says what, where (byte offset or field), and what was expected.

    During a run this is data, not a crash: the client records it in the request's timeline and goes on.
    """
