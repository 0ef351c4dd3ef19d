"""The WebSocket client's own reader of server frames: exact on text frames however split, and it hands
anything else to the full parser at the right byte."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from infer_bench.clients.websocket import read_text_frames

FAST = settings(max_examples=300, deadline=None)


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, mask: bytes | None = None) -> bytes:
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    masked = 0x80 if mask else 0
    if size < 126:
        head = bytes((first, masked | size))
    elif size < 65536:
        head = struct.pack("!BBH", first, masked | 126, size)
    else:
        head = struct.pack("!BBQ", first, masked | 127, size)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + payload
    return head + payload


payloads = st.lists(
    st.binary(max_size=300) | st.sampled_from([b"x" * 125, b"y" * 126, b"z" * 65535, b"w" * 65536]), max_size=8
)


@FAST
@given(payloads, st.data())
def test_text_frames_split_anywhere_read_back_exactly(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    read: list[bytes] = []
    rest = b""
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got, rest, other = read_text_frames(rest + stream[a:b])
        assert other is None
        read += got
    assert read == messages
    assert rest == b""


@FAST
@given(payloads, payloads, st.sampled_from([0x9, 0xA, 0x8, 0x2, 0x0]))
def test_any_other_frame_is_handed_over_from_its_first_byte(before: list[bytes], after: list[bytes], op: int) -> None:
    other = frame(b"ping", opcode=op)
    stream = b"".join(frame(m) for m in before) + other + b"".join(frame(m) for m in after)
    got, rest, handed = read_text_frames(stream)
    assert got == before
    assert rest == b""
    assert handed == stream[len(stream) - len(other) - sum(len(frame(m)) for m in after) :]


def test_fragmented_masked_or_reserved_frames_are_not_read_here() -> None:
    for odd in (frame(b"a", fin=False), frame(b"a", mask=b"\x01\x02\x03\x04"), bytes((0xC1, 1)) + b"a"):
        got, _, handed = read_text_frames(frame(b"ok") + odd)
        assert got == [b"ok"]
        assert handed == odd
