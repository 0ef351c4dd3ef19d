"""Continuous batching: step costs, admission at step boundaries, cancellation, faults — on virtual time."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from reference_server.channels import EndReason, StreamEnd
from reference_server.errors import Overloaded
from reference_server.metrics import ServerMetrics
from reference_server.models import TokensModel
from reference_server.scheduler import ContinuousScheduler, GenerationRequest, Sequence
from reference_server.settings import TokensModelSpec

pytestmark = pytest.mark.anyio

# Step costs chosen so every figure below is exact: a step of n sequences costs 5 + 1·n ms, and a prompt
# of two words adds a prefill of 1 + 0.5·2 = 2 ms to the step it joins.
COSTS = {"base_ms": 5.0, "per_seq_ms": 1.0, "prefill_ms": 1.0, "per_input_token_ms": 0.5}
PROMPT = "two words"


@pytest.fixture
def anyio_backend(virtual_time: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    return virtual_time


@asynccontextmanager
async def running(
    max_num_seqs: int = 8, max_queue: int = 16, stream_buffer: int = 1024, **spec: Any
) -> AsyncIterator[ContinuousScheduler]:
    model = TokensModel(TokensModelSpec(**{**COSTS, **spec}))
    scheduler = ContinuousScheduler(
        model, max_num_seqs=max_num_seqs, max_queue=max_queue, stream_buffer=stream_buffer, metrics=ServerMetrics()
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        yield scheduler
        tg.cancel_scope.cancel()


async def read_all(seq: Sequence) -> tuple[list[float], list[str], StreamEnd]:
    """Virtual arrival times and texts of every token of ``seq``, and how it ended."""
    times: list[float] = []
    texts: list[str] = []
    while True:
        tokens, end = await seq.channel.receive()
        now = anyio.current_time()
        times += [now] * len(tokens)
        texts += [t.text for t in tokens]
        if end is not None:
            return times, texts, end


async def test_first_token_costs_prefill_plus_one_step_and_each_next_one_step() -> None:
    async with running() as scheduler:
        start = anyio.current_time()
        times, _, end = await read_all(scheduler.submit(GenerationRequest(PROMPT, max_tokens=4)))
    offsets = [round((t - start) * 1000, 6) for t in times]
    assert offsets == [8.0, 14.0, 20.0, 26.0]  # 2 prefill + 6 step, then 6 per step (5 + 1 seq)
    assert end.reason is EndReason.FINISHED
    assert (end.finish_reason, end.prompt_tokens, end.completion_tokens) == ("length", 2, 4)


async def test_step_cost_grows_with_the_running_batch() -> None:
    async with running() as scheduler:
        a = scheduler.submit(GenerationRequest(PROMPT, max_tokens=3))
        b = scheduler.submit(GenerationRequest(PROMPT, max_tokens=3))
        start = anyio.current_time()
        (ta, _, _), (tb, _, _) = await read_both(a, b)
    # Both join the first step (2 prefills = 4 ms, step of 2 = 7 ms), then 7 ms per step.
    assert [round((t - start) * 1000, 6) for t in ta] == [11.0, 18.0, 25.0]
    assert ta == tb


async def read_both(a: Sequence, b: Sequence) -> tuple[Any, Any]:
    out: dict[str, Any] = {}

    async def read(name: str, seq: Sequence) -> None:
        out[name] = await read_all(seq)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, "a", a)
        tg.start_soon(read, "b", b)
    return out["a"], out["b"]


async def test_at_most_max_num_seqs_run_and_the_rest_join_at_a_step_boundary() -> None:
    async with running(max_num_seqs=1) as scheduler:
        first = scheduler.submit(GenerationRequest(PROMPT, max_tokens=2))
        second = scheduler.submit(GenerationRequest(PROMPT, max_tokens=2))
        start = anyio.current_time()
        await anyio.sleep(0.001)  # mid-way through the first step
        assert (scheduler.running, scheduler.waiting) == (1, 1)
        (t1, _, _), (t2, _, _) = await read_both(first, second)
    assert [round((t - start) * 1000, 6) for t in t1] == [8.0, 14.0]
    # The second joins at the boundary after the first finished: its prefill is paid in that step.
    assert [round((t - start) * 1000, 6) for t in t2] == [22.0, 28.0]
    assert second.started_at is not None
    assert round((second.started_at - start) * 1000, 6) == 14.0


async def test_cancelled_sequence_leaves_the_batch_at_the_next_step() -> None:
    async with running() as scheduler:
        seq = scheduler.submit(GenerationRequest(PROMPT, max_tokens=100))
        tokens, _ = await seq.channel.receive()
        assert len(tokens) == 1
        scheduler.cancel(seq)
        _, _, end = await read_all(seq)
        assert end.reason is EndReason.CANCELLED
        assert end.completion_tokens == 1
        assert scheduler.running == 0


async def test_cancelling_a_waiting_sequence_ends_it_at_once() -> None:
    async with running(max_num_seqs=1) as scheduler:
        scheduler.submit(GenerationRequest(PROMPT, max_tokens=50))
        queued = scheduler.submit(GenerationRequest(PROMPT, max_tokens=5))
        await anyio.sleep(0.001)  # mid-way through the first step: the first sequence runs
        scheduler.cancel(queued)
        assert scheduler.waiting == 0
        tokens, end = await queued.channel.receive()
        assert tokens == []
        assert end is not None
        assert end.reason is EndReason.CANCELLED


async def test_injected_failure_ends_the_stream_with_model_error_mid_way() -> None:
    async with running(fail_rate=1.0) as scheduler:
        _, texts, end = await read_all(scheduler.submit(GenerationRequest(PROMPT, max_tokens=20)))
    assert end.reason is EndReason.MODEL_ERROR
    assert len(texts) < 20
    assert end.completion_tokens == len(texts)


async def test_injected_stall_pauses_one_sequence_for_stall_ms() -> None:
    async with running(stall_rate=1.0, stall_ms=100.0) as scheduler:
        times, texts, end = await read_all(scheduler.submit(GenerationRequest(PROMPT, max_tokens=10)))
    gaps = [round((b - a) * 1000, 6) for a, b in itertools.pairwise(times)]
    assert end.reason is EndReason.FINISHED
    assert len(texts) == 10
    assert max(gaps) >= 100.0
    assert sorted(gaps)[:-1] == [6.0] * (len(gaps) - 1)  # every other gap is one step


async def test_a_reader_that_never_reads_is_dropped_without_slowing_the_step() -> None:
    async with running(stream_buffer=3) as scheduler:
        stuck = scheduler.submit(GenerationRequest(PROMPT, max_tokens=50))
        healthy = scheduler.submit(GenerationRequest(PROMPT, max_tokens=6))
        start = anyio.current_time()
        times, _, end = await read_all(healthy)
        assert end.reason is EndReason.FINISHED
        assert stuck.channel.closed
    # Healthy tokens keep the batch's step cadence: 2 sequences at 7 ms, then 1 sequence at 6 ms.
    assert [round((t - start) * 1000, 6) for t in times] == [11.0, 18.0, 25.0, 32.0, 38.0, 44.0]


async def test_queue_full_refuses_new_work() -> None:
    async with running(max_num_seqs=1, max_queue=1) as scheduler:
        scheduler.submit(GenerationRequest(PROMPT, max_tokens=5))
        await anyio.sleep(0.001)  # mid-way through the first step: the first sequence runs
        scheduler.submit(GenerationRequest(PROMPT, max_tokens=5))
        with pytest.raises(Overloaded) as refused:
            scheduler.submit(GenerationRequest(PROMPT, max_tokens=5))
        assert refused.value.reason == "queue_full"


async def test_abort_all_ends_every_sequence_with_shutdown() -> None:
    async with running(max_num_seqs=1) as scheduler:
        seqs = [scheduler.submit(GenerationRequest(PROMPT, max_tokens=50)) for _ in range(3)]
        await anyio.sleep(0.02)
        scheduler.abort_all()
        ends = [(await read_all(s))[2] for s in seqs]
    assert {e.reason for e in ends} == {EndReason.SHUTDOWN}


async def test_same_prompt_and_seed_give_the_same_tokens() -> None:
    async with running() as scheduler:
        runs = [await read_all(scheduler.submit(GenerationRequest(PROMPT, 12, seed=s))) for s in (7, 7, 8)]
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]
