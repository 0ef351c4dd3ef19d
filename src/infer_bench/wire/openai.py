"""OpenAI streaming chunks: the ``data:`` of one SSE event in, ``OpenAIDelta`` out.

Both OpenAI streaming shapes are read, and what OpenAI-compatible servers (vLLM, TGI, llama.cpp, ours) add:

    chat         {"choices": [{"delta": {"role": "assistant", "content": "Hi"}, "finish_reason": null}]}
    completion   {"choices": [{"text": "Hi", "finish_reason": null}]}
    usage        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
    error        {"error": {"message": "...", "code": ...}}       (also {"error": "..."})
    end          [DONE]

Only ``choices[0]`` is read (the benchmark asks for one choice). Fields this tool does not measure
(``tool_calls``, ``logprobs``, ``reasoning_content``, ids, ``model``) are not validated. Anything else that is
not the shape above is a ``ProtocolError`` naming the field: a load test must count a broken chunk, not crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson

from infer_bench.wire import ProtocolError

__all__ = ["OpenAIDelta", "parse_openai_data"]

_USAGE_FIELDS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")
_EXCERPT_CHARS: Final = 80


@dataclass(frozen=True, slots=True)
class OpenAIDelta:
    """What one chunk says.

    Attributes:
        text: the new text (``""`` when the chunk carries none).
        role_only: a chat chunk announcing the role with no text (the first chunk of a chat stream).
        finish_reason: ``choices[0].finish_reason`` when set (``"stop"``, ``"length"``, …).
        usage: token counts from ``usage`` (any of prompt/completion/total tokens it gives), else ``None``.
        error: the message (or code) of an in-stream ``error`` object, else ``None``.
        done: the ``[DONE]`` sentinel that ends the stream.
    """

    text: str
    role_only: bool
    finish_reason: str | None
    usage: dict[str, int] | None
    error: str | None
    done: bool


DONE: Final = OpenAIDelta(text="", role_only=False, finish_reason=None, usage=None, error=None, done=True)

# The generated __init__ of a frozen dataclass sets each field through object.__setattr__ (~0.7 µs for six
# fields, more than orjson takes to parse the chunk); setting the slots directly builds the same object faster.
_new_object = object.__new__
_set_text: Callable[[OpenAIDelta, str], None] = vars(OpenAIDelta)["text"].__set__
_set_role_only: Callable[[OpenAIDelta, bool], None] = vars(OpenAIDelta)["role_only"].__set__
_set_finish_reason: Callable[[OpenAIDelta, str | None], None] = vars(OpenAIDelta)["finish_reason"].__set__
_set_usage: Callable[[OpenAIDelta, dict[str, int] | None], None] = vars(OpenAIDelta)["usage"].__set__
_set_error: Callable[[OpenAIDelta, str | None], None] = vars(OpenAIDelta)["error"].__set__
_set_done: Callable[[OpenAIDelta, bool], None] = vars(OpenAIDelta)["done"].__set__


def _make_delta(
    text: str, role_only: bool, finish_reason: str | None, usage: dict[str, int] | None, error: str | None
) -> OpenAIDelta:
    made: OpenAIDelta = _new_object(OpenAIDelta)
    _set_text(made, text)
    _set_role_only(made, role_only)
    _set_finish_reason(made, finish_reason)
    _set_usage(made, usage)
    _set_error(made, error)
    _set_done(made, False)
    return made


def parse_openai_data(data: str) -> OpenAIDelta:
    """Read the ``data`` of one SSE event of an OpenAI-compatible stream.

    Raises:
        ProtocolError: not JSON, not a JSON object, or a field this tool reads has the wrong type.
    """
    if data == "[DONE]":
        return DONE
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"OpenAI chunk: invalid JSON ({exc}): {_excerpt(data)}") from None
    if type(chunk) is not dict:
        raise ProtocolError(f"OpenAI chunk: expected a JSON object, got {_json_type(chunk)}: {_excerpt(data)}")

    text = ""
    role_only = False
    finish_reason = None
    choices = chunk.get("choices")
    if choices:
        if type(choices) is not list:
            raise _wrong("choices", "a list", choices)
        choice = choices[0]
        if type(choice) is not dict:
            raise _wrong("choices[0]", "an object", choice)
        delta = choice.get("delta")
        if delta is not None:  # chat completion chunk
            if type(delta) is not dict:
                raise _wrong("choices[0].delta", "an object", delta)
            content = delta.get("content")
            if content:
                if type(content) is not str:
                    raise _wrong("choices[0].delta.content", "a string or null", content)
                text = content
            elif content is not None and content != "":
                raise _wrong("choices[0].delta.content", "a string or null", content)
            else:
                role_only = "role" in delta
        else:  # text completion chunk
            content = choice.get("text")
            if content is not None:
                if type(content) is not str:
                    raise _wrong("choices[0].text", "a string or null", content)
                text = content
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None and type(finish_reason) is not str:
            raise _wrong("choices[0].finish_reason", "a string or null", finish_reason)
    elif choices is not None and type(choices) is not list:
        raise _wrong("choices", "a list", choices)

    usage = chunk.get("usage")
    if usage is not None:
        usage = _read_usage(usage)
    error = chunk.get("error")
    if error is not None:
        error = _read_error(error)
    return _make_delta(text, role_only, finish_reason, usage, error)


def _read_usage(usage: object) -> dict[str, int]:
    if type(usage) is not dict:
        raise _wrong("usage", "an object", usage)
    counts: dict[str, int] = {}
    for field in _USAGE_FIELDS:
        value = usage.get(field)
        if value is None:
            continue
        if type(value) is not int or value < 0:
            raise _wrong(f"usage.{field}", "an integer >= 0", value)
        counts[field] = value
    return counts


def _read_error(error: object) -> str:
    if type(error) is str:
        return error
    if type(error) is not dict:
        raise _wrong("error", "an object or a string", error)
    for field in ("message", "code", "type"):
        value = error.get(field)
        if value is not None and value != "":
            return value if type(value) is str else orjson.dumps(value).decode()
    return "unknown error (an error object with no message, code or type)"


def _wrong(field: str, expected: str, got: object) -> ProtocolError:
    shown = orjson.dumps(got).decode()
    return ProtocolError(f"OpenAI chunk: {field}: expected {expected}, got {_json_type(got)} {_excerpt(shown)}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "a boolean"
    if type(value) is dict:
        return "an object"
    if type(value) is list:
        return "an array"
    if type(value) is str:
        return "a string"
    return "a number"


def _excerpt(text: str) -> str:
    if len(text) <= _EXCERPT_CHARS:
        return repr(text)
    return repr(text[:_EXCERPT_CHARS]) + f"… ({len(text)} characters)"
