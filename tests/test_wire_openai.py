"""OpenAI streaming chunks: the shapes servers send, and a ProtocolError (never another error) for the rest."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infer_bench.wire import ProtocolError
from infer_bench.wire.openai import OpenAIDelta, parse_openai_data

FAST = settings(max_examples=200, deadline=None)


def delta(
    text: str = "",
    *,
    role_only: bool = False,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    error: str | None = None,
    done: bool = False,
) -> OpenAIDelta:
    return OpenAIDelta(text=text, role_only=role_only, finish_reason=finish_reason, usage=usage, error=error, done=done)


def chat(delta_body: object, finish_reason: object = None, **extra: object) -> str:
    choice = {"index": 0, "delta": delta_body, "logprobs": None, "finish_reason": finish_reason}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return orjson.dumps({**chunk, **extra}).decode()


def completion(text: object, finish_reason: object = None) -> str:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return orjson.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice]}).decode()


USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param("[DONE]", delta(done=True), id="done"),
        pytest.param(chat({"role": "assistant", "content": ""}), delta(role_only=True), id="chat-role-empty-content"),
        pytest.param(chat({"role": "assistant"}), delta(role_only=True), id="chat-role-alone"),
        pytest.param(chat({"role": "assistant", "content": None}), delta(role_only=True), id="chat-role-null-content"),
        pytest.param(chat({"role": "assistant", "content": "Hi"}), delta("Hi"), id="chat-role-with-text"),
        pytest.param(chat({"content": " the"}), delta(" the"), id="chat-content"),
        pytest.param(chat({"content": None}), delta(), id="chat-null-content"),
        pytest.param(chat({"content": ""}), delta(), id="chat-empty-content"),
        pytest.param(chat({}, "stop"), delta(finish_reason="stop"), id="chat-finish-empty-delta"),
        pytest.param(chat({"content": "."}, "length"), delta(".", finish_reason="length"), id="chat-text-and-finish"),
        pytest.param(chat({"reasoning_content": "hmm"}), delta(), id="chat-unread-fields-ignored"),
        pytest.param(chat({"content": "a"}, usage=USAGE), delta("a", usage=USAGE), id="chat-usage-on-every-chunk-vllm"),
        pytest.param(chat({"content": "a"}, usage=None), delta("a"), id="chat-null-usage"),
        pytest.param(completion(" the"), delta(" the"), id="completion-text"),
        pytest.param(completion(None), delta(), id="completion-null-text"),
        pytest.param(completion("", "stop"), delta(finish_reason="stop"), id="completion-finish"),
        pytest.param(orjson.dumps({"choices": [], "usage": USAGE}).decode(), delta(usage=USAGE), id="usage-chunk"),
        pytest.param(
            orjson.dumps({"choices": [], "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": 2}}}).decode(),
            delta(usage=USAGE),
            id="usage-details-dropped",
        ),
        pytest.param(
            orjson.dumps({"usage": {"completion_tokens": 3}}).decode(),
            delta(usage={"completion_tokens": 3}),
            id="usage-partial",
        ),
        pytest.param('{"choices": []}', delta(), id="no-choices"),
        pytest.param("{}", delta(), id="empty-object"),
        pytest.param(
            '{"error": {"message": "overloaded", "code": 503}}', delta(error="overloaded"), id="error-message"
        ),
        pytest.param('{"error": {"message": "", "code": 503}}', delta(error="503"), id="error-code-number"),
        pytest.param('{"error": {"code": "rate_limited"}}', delta(error="rate_limited"), id="error-code-string"),
        pytest.param('{"error": {"type": "server_error"}}', delta(error="server_error"), id="error-type"),
        pytest.param(
            '{"error": {}}',
            delta(error="unknown error (an error object with no message, code or type)"),
            id="error-empty",
        ),
        pytest.param('{"error": "boom"}', delta(error="boom"), id="error-string"),
        pytest.param('{"error": null, "choices": []}', delta(), id="error-null"),
        pytest.param(' {"choices": []}\n', delta(), id="whitespace-around-json"),
    ],
)
def test_reads_chunk(data: str, expected: OpenAIDelta) -> None:
    assert parse_openai_data(data) == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param("", "invalid JSON", id="empty"),
        pytest.param("{", "invalid JSON", id="truncated"),
        pytest.param("[DONE] ", "invalid JSON", id="done-with-space"),
        pytest.param('{"a": NaN}', "invalid JSON", id="nan"),
        pytest.param('"\\ud800"', "invalid JSON", id="lone-surrogate-escape"),
        pytest.param("[" * 2000, "invalid JSON", id="too-deep"),
        pytest.param("[]", "expected a JSON object, got an array", id="array"),
        pytest.param("null", "expected a JSON object, got null", id="null"),
        pytest.param("3", "expected a JSON object, got a number", id="number"),
        pytest.param('{"choices": {}}', "choices: expected a list", id="choices-object-empty"),
        pytest.param('{"choices": {"a": 1}}', "choices: expected a list", id="choices-object"),
        pytest.param('{"choices": "x"}', "choices: expected a list", id="choices-string"),
        pytest.param('{"choices": 0}', "choices: expected a list", id="choices-zero"),
        pytest.param('{"choices": [1]}', r"choices\[0\]: expected an object", id="choice-number"),
        pytest.param(chat([]), r"choices\[0\]\.delta: expected an object", id="delta-array"),
        pytest.param(chat({"content": 1}), r"delta\.content: expected a string or null, got a number", id="content"),
        pytest.param(chat({"content": 0}), r"delta\.content: expected a string or null", id="content-zero"),
        pytest.param(chat({"content": False}), r"delta\.content: .* got a boolean", id="content-false"),
        pytest.param(chat({"content": ["a"]}), r"delta\.content: .* got an array", id="content-array"),
        pytest.param(completion(1), r"choices\[0\]\.text: expected a string", id="text-number"),
        pytest.param(chat({}, 1), r"finish_reason: expected a string or null", id="finish-reason-number"),
        pytest.param('{"usage": []}', "usage: expected an object", id="usage-array"),
        pytest.param('{"usage": {"prompt_tokens": "5"}}', r"usage\.prompt_tokens: expected an integer", id="str"),
        pytest.param('{"usage": {"total_tokens": -1}}', r"usage\.total_tokens: expected an integer >= 0", id="neg"),
        pytest.param('{"usage": {"total_tokens": true}}', r"usage\.total_tokens: .* got a boolean", id="bool"),
        pytest.param('{"usage": {"total_tokens": 1.0}}', r"usage\.total_tokens: .* got a number", id="float"),
        pytest.param('{"error": 5}', "error: expected an object or a string", id="error-number"),
    ],
)
def test_rejects_malformed_chunk_naming_the_field(data: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_openai_data(data)


def test_error_message_quotes_a_long_chunk_in_part() -> None:
    with pytest.raises(ProtocolError, match=r"\(10001 characters\)$") as caught:
        parse_openai_data("x" * 10_001)
    assert len(str(caught.value)) < 300


def test_done_is_one_shared_value() -> None:
    assert parse_openai_data("[DONE]") is parse_openai_data("[DONE]")


# --- properties -----------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def maybe(key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), values.map(lambda value: {key: value}))


def merged(*parts: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(*parts).map(lambda dicts: {k: v for d in dicts for k, v in d.items()})


# Chunk-shaped JSON where any field may hold any JSON value: reaches every type check.
chunk_like = merged(
    maybe(
        "choices",
        json_values
        | st.lists(
            merged(maybe("delta", json_values | merged(maybe("content", json_values), maybe("role", json_values))))
            | merged(maybe("text", json_values), maybe("finish_reason", json_values))
            | json_values,
            max_size=2,
        ),
    ),
    maybe("usage", json_values | st.dictionaries(st.sampled_from(["prompt_tokens", "total_tokens"]), json_values)),
    maybe("error", json_values | merged(maybe("message", json_values), maybe("code", json_values))),
)


@FAST
@given(st.text(max_size=200))
def test_arbitrary_text_gives_a_delta_or_protocol_error(data: str) -> None:
    with contextlib.suppress(ProtocolError):
        assert isinstance(parse_openai_data(data), OpenAIDelta)


@FAST
@given(chunk_like | json_values)
def test_arbitrary_json_gives_a_delta_or_protocol_error(value: object) -> None:
    with contextlib.suppress(ProtocolError):
        assert isinstance(parse_openai_data(orjson.dumps(value).decode()), OpenAIDelta)


@FAST
@given(
    st.text(max_size=20),
    st.none() | st.sampled_from(["stop", "length"]),
    st.none() | st.fixed_dictionaries({"prompt_tokens": st.integers(0, 10**6), "total_tokens": st.integers(0, 10**6)}),
    st.booleans(),
)
def test_valid_chunks_give_back_what_they_carry(
    text: str, finish_reason: str | None, usage: dict[str, int] | None, chat_shape: bool
) -> None:
    if chat_shape:
        data = chat({"content": text}, finish_reason, usage=usage)
    else:
        data = orjson.dumps({"choices": [{"text": text, "finish_reason": finish_reason}], "usage": usage}).decode()
    assert parse_openai_data(data) == delta(text, finish_reason=finish_reason, usage=usage)
