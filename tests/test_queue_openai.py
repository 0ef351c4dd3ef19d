"""The OpenAI-compatible routes over the queue, read by the official ``openai`` client: chat and legacy
completions, streamed and whole, produced by a real worker process on Redis (and on the in-process
queue), with the tokens the model generates, in order, exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings
from test_e2e_openai import openai_client
from test_queue_frontend import Queue, expected_tokens

pytestmark = pytest.mark.slow

PROMPT = "tell me about queues"


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Queue, openai.OpenAI]]:
    """One worker process and one front end for the tests of this module (they change nothing but counters)."""
    queue = Queue(redis_url, tmp_path_factory.mktemp("queue-openai"))
    try:
        queue.worker("wa")
        with queue.embedded() as server, openai_client(server) as client:
            yield queue, client
    finally:
        queue.close()


def test_a_streamed_chat_completion_is_the_jobs_tokens_then_finish_reason_and_usage(
    served: tuple[Queue, openai.OpenAI],
) -> None:
    queue, client = served
    chunks = list(
        client.chat.completions.create(
            model="tokens",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=12,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert deltas == expected_tokens(queue, PROMPT, 12, seed=3)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.completion_tokens, usage.total_tokens - usage.prompt_tokens) == (12, 12)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")


def test_whole_and_legacy_completions_give_the_same_text_as_the_stream(served: tuple[Queue, openai.OpenAI]) -> None:
    queue, client = served
    expected = "".join(expected_tokens(queue, PROMPT, 8, seed=5))
    whole = client.chat.completions.create(
        model="tokens", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, seed=5
    )
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 8
    legacy = client.completions.create(model="tokens", prompt=PROMPT, max_tokens=8, seed=5)
    assert legacy.choices[0].text == expected
    streamed = client.completions.create(model="tokens", prompt=PROMPT, max_tokens=8, seed=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_an_unknown_model_is_openais_not_found(served: tuple[Queue, openai.OpenAI]) -> None:
    _, client = served
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert caught.value.code == "model_not_found"


def test_openai_routes_run_on_the_in_process_queue_too(tmp_path: Path) -> None:
    settings = ServerSettings.model_validate({"queue_url": "memory://", "graceful_shutdown_s": 1})
    with EmbeddedServer(settings) as server, openai_client(server) as client:
        assert server.state.queue is not None
        assert server.state.queue.in_process
        whole = client.chat.completions.create(
            model="tokens", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, seed=1
        )
        streamed = client.chat.completions.create(
            model="tokens", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, seed=1, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert whole.choices[0].message.content == text
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 6
