"""The /predict batcher: size-or-timeout flushing, on trio's virtual clock (no wall-clock asserts)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from reference_server.batcher import BatchPolicy, FlushReason, ModelFailed, Prediction, RequestBatcher
from reference_server.errors import Overloaded
from reference_server.metrics import ServerMetrics
from reference_server.models import EchoModel
from reference_server.settings import EchoModelSpec

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend(virtual_time: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    return virtual_time


@pytest.mark.parametrize(
    ("queued", "oldest", "now", "expected"),
    [
        pytest.param(8, 0.0, 0.0, FlushReason.SIZE, id="full-batch-flushes-at-once"),
        pytest.param(3, 0.0, 0.004, 0.010, id="partial-batch-waits-for-oldest-deadline"),
        pytest.param(3, 0.0, 0.010, FlushReason.TIMEOUT, id="deadline-reached-flushes"),
        pytest.param(1, 5.0, 5.011, FlushReason.TIMEOUT, id="late-wakeup-still-flushes"),
    ],
)
def test_policy_decides_from_queue_size_and_oldest_age(
    queued: int, oldest: float, now: float, expected: FlushReason | float
) -> None:
    assert BatchPolicy(batch_size=8, timeout_s=0.010).decide(queued, oldest, now) == expected


def test_policy_with_zero_timeout_drains_whatever_is_queued() -> None:
    assert BatchPolicy(batch_size=8, timeout_s=0).decide(1, 0.0, 0.0) is FlushReason.DRAIN


class ExplodingModel(EchoModel):
    def predict_batch(self, inputs: list[Any]) -> list[Any]:
        if "boom" in inputs:
            raise RuntimeError("model fault")
        return super().predict_batch(inputs)


def make(batch_size: int = 8, timeout_s: float = 0.010, *, base_ms: float = 0.0, max_queue: int = 100,
         model_cls: type[EchoModel] = EchoModel) -> tuple[RequestBatcher, ServerMetrics]:  # fmt: skip
    metrics = ServerMetrics()
    model = model_cls(EchoModelSpec(base_ms=base_ms, per_item_ms=0))
    return RequestBatcher(model, BatchPolicy(batch_size, timeout_s), max_queue=max_queue, metrics=metrics), metrics


async def predict_all(batcher: RequestBatcher, values: list[Any], gap_s: float = 0.0) -> list[tuple[Prediction, float]]:
    """Send ``values`` ``gap_s`` apart; return each prediction with the virtual time it completed."""
    done: dict[int, tuple[Prediction, float]] = {}

    async def one(i: int, value: Any) -> None:
        done[i] = (await batcher.predict(value), anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.run)
        async with anyio.create_task_group() as clients:
            for i, value in enumerate(values):
                clients.start_soon(one, i, value)
                if gap_s:
                    await anyio.sleep(gap_s)
        tg.cancel_scope.cancel()
    return [done[i] for i in range(len(values))]


def flushes(metrics: ServerMetrics) -> dict[str, float]:
    return {values[1]: c.value for values, c in metrics.batches.children.items()}


async def test_batch_flushes_on_timeout_when_not_full() -> None:
    batcher, metrics = make(batch_size=8, timeout_s=0.010)
    start = anyio.current_time()
    results = await predict_all(batcher, ["a", "b", "c"])
    assert [p.output for p, _ in results] == ["a", "b", "c"]
    assert {p.batch_size for p, _ in results} == {3}
    assert all(at - start == pytest.approx(0.010) for _, at in results)
    assert flushes(metrics) == {"timeout": 1}


async def test_batch_flushes_at_once_when_full() -> None:
    batcher, metrics = make(batch_size=4, timeout_s=1.0)
    start = anyio.current_time()
    results = await predict_all(batcher, list(range(4)))
    assert all(at == pytest.approx(start) for _, at in results)
    assert flushes(metrics) == {"size": 1}


async def test_timeout_counts_from_the_oldest_request_not_the_newest() -> None:
    batcher, _ = make(batch_size=8, timeout_s=0.010)
    start = anyio.current_time()
    results = await predict_all(batcher, ["a", "b", "c"], gap_s=0.004)  # arrivals at 0, 4, 8 ms
    assert all(at - start == pytest.approx(0.010) for _, at in results)
    assert [round(p.queue_s * 1000, 6) for p, _ in results] == [10.0, 6.0, 2.0]


async def test_zero_timeout_batches_what_queued_while_the_model_ran() -> None:
    """Opportunistic mode: the first request runs alone; the ones arriving during its 5 ms run together."""
    batcher, metrics = make(batch_size=32, timeout_s=0, base_ms=5.0)
    results = await predict_all(batcher, list(range(5)), gap_s=0.001)
    assert [p.batch_size for p, _ in results] == [1, 4, 4, 4, 4]
    assert flushes(metrics) == {"drain": 2}


async def test_full_queue_refuses_with_overloaded() -> None:
    batcher, metrics = make(batch_size=8, timeout_s=1.0, max_queue=2)
    batcher.submit("a")
    batcher.submit("b")
    with pytest.raises(Overloaded) as refused:
        batcher.submit("c")
    assert refused.value.reason == "queue_full"
    assert metrics.rejections.child("queue_full").value == 1


async def test_model_fault_fails_only_its_own_batch() -> None:
    batcher, metrics = make(batch_size=2, timeout_s=0.001, model_cls=ExplodingModel)
    outcomes: list[str] = []

    async def one(value: str) -> None:
        try:
            outcomes.append((await batcher.predict(value)).output)
        except ModelFailed:
            outcomes.append(f"failed:{value}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.run)
        async with anyio.create_task_group() as clients:
            for value in ["boom", "x"]:
                clients.start_soon(one, value)
            await anyio.sleep(0.005)
            for value in ["y", "z"]:
                clients.start_soon(one, value)
        tg.cancel_scope.cancel()
    assert sorted(outcomes) == ["failed:boom", "failed:x", "y", "z"]
    assert metrics.batch_failures.child("predict").value == 1
