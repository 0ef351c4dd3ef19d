"""The OpenAI-compatible routes end to end, read by the official ``openai`` client over loopback.

If the official client parses our streams and raises its usual typed errors, so will the many tools
built on it; these tests hold the wire format to that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from polling import wait_until
from reference_server.serve import EmbeddedServer

pytestmark = pytest.mark.slow  # real servers on loopback; still run in CI

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "tell me about continuous batching"},
]
PROMPT = "tell me about continuous batching"


def openai_client(server: EmbeddedServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1",
        api_key="x",
        max_retries=0,  # a retry would hide a refusal behind a second request
        timeout=10.0,
        # trust_env=False: no proxy from the environment may take loopback traffic elsewhere.
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    """One default server and client for the tests that change nothing on the server but counters."""
    with EmbeddedServer() as server, openai_client(server) as c:
        yield c


# --- chat completions -----------------------------------------------------------------------------


def test_chat_stream_deltas_join_to_the_non_streaming_text(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=12, seed=5)
    chunks = list(client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=12, seed=5, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = whole.choices[0].message.content
    assert text
    assert streamed == text
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.object == "chat.completion"
    assert whole.usage is not None
    assert (whole.usage.completion_tokens, whole.usage.prompt_tokens) == (12, 8)
    assert whole.usage.total_tokens == 20


def test_chat_stream_opens_with_a_role_only_chunk_and_ends_with_finish_reason(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=4, stream=True))
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert (first.delta.role, first.delta.content, first.finish_reason) == ("assistant", "", None)
    assert last.finish_reason == "length"
    assert not last.delta.content
    content = [c.choices[0] for c in chunks[1:-1]]
    assert len(content) == 4
    assert all(c.delta.content and c.finish_reason is None for c in content)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert all(c.usage is None for c in chunks)


def test_chat_stream_with_include_usage_ends_with_a_usage_chunk_without_choices(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tokens", messages=MESSAGES, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": 8,
        "completion_tokens": 3,
        "total_tokens": 11,
    }
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=9, max_completion_tokens=2)
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 2


def test_chat_without_max_tokens_finishes_with_stop(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tokens", messages=MESSAGES)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    assert 16 <= whole.usage.completion_tokens <= 128  # the tokens model's default output range


# --- legacy completions ---------------------------------------------------------------------------


def test_completions_stream_and_whole_give_the_same_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tokens", prompt=PROMPT, max_tokens=10, seed=9)
    chunks = list(client.completions.create(model="tokens", prompt=PROMPT, max_tokens=10, seed=9, stream=True))
    assert whole.choices[0].text
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len(chunks) == 11  # a chunk per token, and the finish reason on its own empty chunk
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (5, 10, 15)


def test_completions_default_to_sixteen_tokens_as_openai_does(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tokens", prompt=PROMPT)
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 16


def test_completions_stream_with_include_usage_ends_with_a_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="tokens", prompt=PROMPT, max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


# --- models and errors ----------------------------------------------------------------------------


def test_models_list_names_the_generation_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert "tokens" in models
    assert "echo" not in models  # a prediction model cannot serve completions
    assert models["tokens"].owned_by == "infer-bench"


CHAT = "chat"
COMPLETIONS = "completions"


def _create(client: openai.OpenAI, route: str, **kwargs: Any) -> Any:
    if route == CHAT:
        return client.chat.completions.create(messages=MESSAGES, **kwargs)
    return client.completions.create(prompt=PROMPT, **kwargs)


@pytest.mark.parametrize("stream", [pytest.param(False, id="whole"), pytest.param(True, id="stream")])
@pytest.mark.parametrize("route", [pytest.param(CHAT, id="chat"), pytest.param(COMPLETIONS, id="completions")])
def test_unknown_model_raises_not_found(client: openai.OpenAI, route: str, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _create(client, route, model="gpt-9", max_tokens=2, stream=stream)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "gpt-9" in caught.value.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        pytest.param({"max_tokens": 0}, "max_tokens", id="zero-max-tokens"),
        pytest.param({"max_tokens": -5}, "max_tokens", id="negative-max-tokens"),
        pytest.param({"n": 2}, "n", id="several-choices"),
        pytest.param({"model": "echo"}, "model", id="prediction-model"),
    ],
)
@pytest.mark.parametrize("route", [pytest.param(CHAT, id="chat"), pytest.param(COMPLETIONS, id="completions")])
def test_invalid_request_raises_bad_request_naming_the_param(
    client: openai.OpenAI, route: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _create(client, route, **{"model": "tokens", **kwargs})
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


def test_chat_with_no_messages_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tokens", messages=[])
    assert caught.value.param == "messages"


# --- streams under faults and heartbeats -----------------------------------------------------------


def test_model_fault_mid_stream_raises_api_error_in_the_client(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {"kind": "tokens", "fail_rate": 1.0}])
    with openai_client(server) as client:
        stream = client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=20, stream=True)
        with pytest.raises(openai.APIError) as caught:
            list(stream)
    assert caught.value.code == "model_error"
    assert caught.value.type == "server_error"


def test_model_fault_without_streaming_answers_502(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {"kind": "tokens", "fail_rate": 1.0}])
    with openai_client(server) as client, pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="tokens", prompt=PROMPT, max_tokens=20)
    assert caught.value.status_code == 502
    assert caught.value.code == "model_error"


@pytest.mark.direct
def test_closing_a_stream_early_cancels_the_generation(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {"kind": "tokens", "base_ms": 20}], graceful_shutdown_s=2)
    metrics, scheduler = server.state.metrics, server.state.registry.schedulers["tokens"]
    with openai_client(server) as client:
        stream = client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=100_000, stream=True)
        with stream:
            for seen, _chunk in enumerate(stream):
                if seen == 2:  # the role chunk and two tokens
                    break
            assert scheduler.running == 1
    wait_until(lambda: metrics.sequences.child("cancelled").value == 1)
    wait_until(lambda: scheduler.running == 0 and scheduler.waiting == 0)
    wait_until(lambda: metrics.active_connections.get(("openai",)) == 0)


def test_heartbeat_comments_are_invisible_to_the_openai_client(start_server: StartServer) -> None:
    server = start_server(heartbeat_s=0.05, models=[ECHO, {"kind": "tokens", "base_ms": 150}])
    with openai_client(server) as client:
        whole = client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=2, seed=1)
        chunks = list(
            client.chat.completions.create(model="tokens", messages=MESSAGES, max_tokens=2, seed=1, stream=True)
        )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
