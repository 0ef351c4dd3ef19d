"""The driver: runs every scenario's executor against the target and feeds the recorder.

This is the only code that sleeps. Each executor is bounded by its own duration (or ``max_duration``)
plus ``graceful_stop``, after which iterations still running are cancelled and counted as interrupted;
a stop request (Ctrl-C, SIGTERM) cancels everything at once. Open-loop arrivals never sleep less than
1 ms and fire every due arrival on each wake-up (MEASUREMENTS.md: shorter sleeps either round up to 1 ms
or spin), and each request records both its intended and its actual send time. A plain HTTP VU of a
closed loop (no think time, bursts or iteration budget) runs as callbacks instead (``clients/http_lane.py``).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from infer_bench.clients import Client, Target, client_maker, lanes
from infer_bench.clients.http_lane import LanePlan, run_plain_vu
from infer_bench.clients.requests import fixed_request, prompts
from infer_bench.metrics.recorder import Recorder, TagKey, tag_key
from infer_bench.plan import arrivals, stage_at, vus_at
from infer_bench.scenario import (
    ConstantArrivalRate,
    ConstantVUs,
    PerVUIterations,
    RampingArrivalRate,
    RampingVUs,
    ScenarioSpec,
    SharedIterations,
    UserClass,
)
from infer_bench.shard import Shard

NS = 1_000_000_000
MIN_SLEEP_S = 0.001
RAMP_TICK_S = 0.05


@dataclass
class ClassRuntime:
    """A user class made ready to send: its request factory, prompt stream and random source."""

    spec: UserClass
    key: TagKey
    new_client: Callable[[], Client]
    lanes: int  # requests one VU keeps in flight (WebSocket in_flight), else 1
    uses_prompts: bool  # plain HTTP sends a fixed body
    prompts: Iterator[str]
    rng: random.Random
    fixed_request: bytes | None  # plain HTTP: the same bytes every time (None for the other protocols)
    # Read once per request: copied out of the spec so the hot path does not walk the model each time.
    timeout_s: float = field(init=False)
    read_delay_s: float = field(init=False)
    reconnect: bool = field(init=False)
    thinks: bool = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        self.timeout_s = spec.timeout
        self.read_delay_s = spec.behavior.read_delay
        self.reconnect = spec.behavior.reconnect
        self.thinks = spec.think_time.max > 0

    def think_s(self) -> float:
        t = self.spec.think_time
        return t.min if t.max <= t.min else self.rng.uniform(t.min, t.max)

    def cancel_after(self) -> int | None:
        b = self.spec.behavior
        if b.cancel_after_tokens is not None and self.rng.random() < b.cancel_probability:
            return b.cancel_after_tokens
        return None


@dataclass
class ScenarioProgress:
    """What the live view shows of one scenario."""

    name: str
    executor: str
    started_ns: int = 0
    ends_ns: int = 0
    vus: int = 0
    in_flight: int = 0
    interrupted: int = 0
    done: bool = False
    requested: int = 0  # open model: arrivals due so far
    dispatched: int = 0  # ... and those that found a VU (the rest were dropped)
    stage: str = ""


@dataclass
class Swarm:
    target: Target
    recorder: Recorder
    clock: Callable[[], int] = time.perf_counter_ns
    shard: Shard = field(default_factory=Shard)
    """The slice of every schedule this swarm runs (all of it unless the run is split into processes)."""
    progress: dict[str, ScenarioProgress] = field(default_factory=dict)
    failure: BaseException | None = None  # a bug of ours inside a VU task: it stops the run, loudly
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _sleepers: set[asyncio.Future[None]] = field(default_factory=set)

    def stop(self) -> None:
        """Stop now: no new requests, in-flight ones cancelled (the result stays valid, marked partial)."""
        self._stop.set()
        for sleeper in self._sleepers:
            _wake(sleeper)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def run(self, scenarios: dict[str, ScenarioSpec], seed: int = 0) -> None:
        start = self.clock()
        runs = [ScenarioRun(self, spec, start, seed + i) for i, spec in enumerate(scenarios.values())]
        for r in runs:
            self.progress[r.spec.name] = r.progress
        await asyncio.gather(*(r.run() for r in runs))
        await asyncio.sleep(0.01)  # let aborted transports finish closing before the loop does

    async def sleep_until(self, due_ns: int) -> bool:
        """Sleep until ``due_ns`` or a stop; False if stopped.

        One future and one timer per sleep (``stop`` wakes every sleeper): the arrival loop sleeps up to
        1,000 times a second, and ``wait_for`` on the stop event would cost a Task each time.
        """
        while not self._stop.is_set():
            wait_s = (due_ns - self.clock()) / NS
            if wait_s <= 0:
                return True
            loop = asyncio.get_running_loop()
            sleeper: asyncio.Future[None] = loop.create_future()
            self._sleepers.add(sleeper)
            timer = loop.call_later(max(wait_s, MIN_SLEEP_S), _wake, sleeper)
            try:
                await sleeper
            finally:
                timer.cancel()
                self._sleepers.discard(sleeper)
            if not self._stop.is_set():
                return True
        return False


def _wake(sleeper: asyncio.Future[None]) -> None:
    if not sleeper.done():
        sleeper.set_result(None)


def _plain_http(runtime: ClassRuntime) -> bool:
    """Plain HTTP with no think time and no bursts: the same request again as soon as a response ends."""
    return runtime.fixed_request is not None and not runtime.thinks and runtime.spec.behavior.burst_size == 1


def _take(budget: list[int] | None) -> bool:
    """Claim one iteration from a budget (None: unlimited); False when it is spent."""
    if budget is None:
        return True
    if budget[0] <= 0:
        return False
    budget[0] -= 1
    return True


class ScenarioRun:
    """One scenario of the file: its classes, its executor, its warmup window."""

    def __init__(self, swarm: Swarm, spec: ScenarioSpec, run_start_ns: int, seed: int) -> None:
        self.swarm = swarm
        self.spec = spec
        self.clock = swarm.clock
        self.recorder = swarm.recorder
        self.shard = swarm.shard
        self.start_ns = run_start_ns + int(spec.start_time * NS)
        self.measure_from_ns = self.start_ns + int(spec.warmup * NS)
        rng = random.Random(seed)
        self.classes = [self._runtime(c, rng.randrange(2**32)) for c in spec.classes]
        weights = list(itertools.accumulate(c.weight for c in spec.classes))
        self._cumulative = [w / weights[-1] for w in weights]
        self._pick = random.Random(rng.randrange(2**32))
        self._vu_classes: list[int] = []  # class index of VU i, grown on demand
        self._vu_credit = [0.0] * len(self.classes)
        self.progress = ScenarioProgress(spec.name, spec.executor.kind)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: dict[int, list[Client]] = {}  # open model: per class, VU lanes waiting for an arrival
        self._lane_plans: dict[int, LanePlan] = {}  # per plain class, what its callback-driven VUs share

    def _runtime(self, cls: UserClass, seed: int) -> ClassRuntime:
        # The scenario's own tags come first; the built-in ones (scenario, class, protocol) win a clash.
        tags = {**self.spec.tags, "scenario": self.spec.name, "class": cls.name, "protocol": cls.protocol}
        if not self.shard.whole:
            # Shards share the run's seed (the schedule and the class picks must agree); their prompts and
            # behaviours must not, or every shard would send the same prompts in the same order.
            seed = random.Random(f"{seed}:shard{self.shard.index}").randrange(2**32)
        rng = random.Random(seed)
        prompt_rng = random.Random(f"{cls.prompts.seed}:{seed}")  # the prompts' own seed, and the run's
        new_client = client_maker(cls, self.swarm.target, self.clock)
        stream = prompts(cls.prompts, prompt_rng)
        fixed = fixed_request(cls, self.swarm.target)
        return ClassRuntime(cls, tag_key(**tags), new_client, lanes(cls), cls.protocol != "http", stream, rng, fixed)

    def class_for_vu(self, index: int) -> ClassRuntime:
        """Deterministic weighted assignment by smooth weighted round-robin (nginx's): every prefix of
        VUs is split as close to the weights as whole VUs allow (weights 3:1 give A A B A, A A B A …)."""
        weights = [c.spec.weight for c in self.classes]
        total = sum(weights)
        while len(self._vu_classes) <= index:
            credit = self._vu_credit
            for i, w in enumerate(weights):
                credit[i] += w
            best = max(range(len(credit)), key=credit.__getitem__)
            credit[best] -= total
            self._vu_classes.append(best)
        return self.classes[self._vu_classes[index]]

    def class_at_random(self) -> ClassRuntime:
        return self.classes[bisect.bisect_left(self._cumulative, self._pick.random())]

    # --- one request ----------------------------------------------------------------------------

    async def iterate(self, client: Client, runtime: ClassRuntime, intended_ns: int) -> None:
        measured = intended_ns >= self.measure_from_ns
        tl = self.recorder.timeline(runtime.key, intended_ns, measured)
        prompt = next(runtime.prompts) if runtime.uses_prompts else ""
        self.recorder.started(self.clock(), intended_ns)
        self.progress.in_flight += 1
        try:
            await client.request(
                tl, prompt, timeout_s=runtime.timeout_s, cancel_after_tokens=runtime.cancel_after(),
                read_delay_s=runtime.read_delay_s, reconnect=runtime.reconnect,
            )  # fmt: skip
        except asyncio.CancelledError:
            self.progress.interrupted += 1
            raise
        finally:
            self.progress.in_flight -= 1
        self.recorder.finished(runtime.key, tl, measured)

    # --- executors ------------------------------------------------------------------------------

    async def run(self) -> None:
        if not await self.swarm.sleep_until(self.start_ns):
            self.progress.done = True
            return
        executor = self.spec.executor
        self.progress.started_ns = self.clock()
        self.progress.ends_ns = self.start_ns + int(executor.total_duration() * NS)
        try:
            if isinstance(executor, ConstantArrivalRate | RampingArrivalRate):
                await self._open(executor)
            else:
                await self._closed(executor)
            await self._drain()
        finally:
            for pool in self._idle.values():
                for client in set(pool):
                    client.close()
            self.progress.done = True

    async def _closed(self, ex: ConstantVUs | RampingVUs | PerVUIterations | SharedIterations) -> None:
        deadline = self.progress.ends_ns
        if isinstance(ex, RampingVUs):
            await self._ramping_vus(ex, deadline)
            return
        owned = self.shard.vus(ex.vus)  # global VU indices: a VU's class is the one it has unsharded
        remaining = [self.shard.shared_iterations(ex.vus, ex.iterations)] if isinstance(ex, SharedIterations) else None
        for i in owned:
            budget = ex.iterations if isinstance(ex, PerVUIterations) else None
            self._spawn(self._vu_loop(i, deadline, budget, remaining))
        self.progress.vus = len(owned)
        await self._wait_tasks_until(deadline)  # iteration executors usually end before their deadline

    async def _ramping_vus(self, ex: RampingVUs, deadline: int) -> None:
        retire: list[asyncio.Event] = []
        while not self.swarm.stopped and self.clock() < deadline:
            t = (self.clock() - self.start_ns) / NS
            target = self.shard.share(vus_at(ex.start_vus, ex.stages, t))  # of the VUs j < target(t), ours
            self.progress.stage = stage_at(ex.stages, t)
            while len(retire) < target:
                flag = asyncio.Event()
                retire.append(flag)
                self._spawn(self._vu_loop(self.shard.nth_vu(len(retire) - 1), deadline, None, None, flag))
            while len(retire) > target:
                retire.pop().set()  # the newest VU leaves after its current iteration (k6's ramp-down)
            self.progress.vus = len(retire)
            await self.swarm.sleep_until(self.clock() + int(RAMP_TICK_S * NS))

    async def _vu_loop(
        self,
        index: int,
        deadline: int,
        budget: int | None,
        shared: list[int] | None,
        retire: asyncio.Event | None = None,
    ) -> None:
        runtime = self.class_for_vu(index)
        behavior = runtime.spec.behavior
        burst = behavior.burst_size
        if _plain_http(runtime) and budget is None and shared is None and retire is None:
            await self._plain_vu(runtime, deadline)  # the usual plain HTTP VU: its closed loop runs in callbacks
            return
        # A burst is `burst` requests at once from this VU: one client each (a WebSocket VU's lanes share
        # one socket). Without bursts a lane sends one request at a time.
        shared_socket = runtime.lanes > 1
        client = runtime.new_client()
        budget_left = [budget] if budget is not None else None  # per VU, shared by its lanes
        plain = burst == 1 and budget_left is None and shared is None

        async def lane() -> None:
            clients = [client] + [client if shared_socket else runtime.new_client() for _ in range(burst - 1)]
            try:
                while not self.swarm.stopped and self.clock() < deadline and not (retire and retire.is_set()):
                    started = self.clock()
                    if plain:  # the usual case: one request, no budget, no Task per request
                        await self.iterate(client, runtime, started)
                        if not runtime.thinks:
                            continue
                    else:
                        sends = [c for c in clients if _take(budget_left) and _take(shared)]
                        if not sends:
                            return
                        if len(sends) == 1:
                            await self.iterate(sends[0], runtime, started)
                        else:
                            await asyncio.gather(*(self.iterate(c, runtime, started) for c in sends))
                    pause = behavior.burst_every - (self.clock() - started) / NS if burst > 1 else 0.0
                    pause = max(pause, runtime.think_s())
                    if pause > 0:
                        await self.swarm.sleep_until(self.clock() + int(pause * NS))
            finally:
                for extra in clients[1:]:
                    if extra is not client:
                        extra.close()

        try:
            await asyncio.gather(*(lane() for _ in range(runtime.lanes)))
        finally:
            client.close()

    async def _plain_vu(self, runtime: ClassRuntime, deadline: int) -> None:
        plan = self._lane_plans.get(id(runtime))
        if plan is None:
            assert runtime.fixed_request is not None
            batch = self.recorder.plain_batch(runtime.key, self.measure_from_ns)
            plan = self._lane_plans[id(runtime)] = LanePlan(
                self.swarm.target, runtime.fixed_request, self.recorder, runtime.key, batch, self.measure_from_ns,
                deadline, runtime.timeout_s, self.clock,
            )  # fmt: skip
        self.progress.in_flight += 1  # a plain VU always has a request in flight (or its connect)
        try:
            await run_plain_vu(plan)
        except asyncio.CancelledError:
            self.progress.interrupted += 1
            now = self.clock()
            self.recorder.started(now, now)  # the request cut short was started; the lane counts at the end
            raise
        finally:
            self.progress.in_flight -= 1

    async def _open(self, ex: ConstantArrivalRate | RampingArrivalRate) -> None:
        """Each arrival picks its class by weight, then an idle VU of that class; ``max_vus`` bounds all.

        A shard walks the whole arrival sequence and picks a class for every arrival, so arrival n has the
        same time and class in every shard count; it sends only the arrivals it owns.
        """
        idle = self._idle
        shard = self.shard
        owned = shard.vus(ex.pre_allocated_vus)
        for i in owned:
            runtime = self.class_for_vu(i)
            idle.setdefault(id(runtime), []).extend([runtime.new_client()] * runtime.lanes)
        allocated, max_vus = len(owned), shard.share(ex.max_vus)
        for n, offset in enumerate(arrivals(ex)):
            runtime = self.class_at_random()
            if not shard.owns(n):
                continue
            due = self.start_ns + int(offset * NS)
            if due > self.clock() + int(MIN_SLEEP_S * NS / 5) and not await self.swarm.sleep_until(due):
                break
            self.progress.requested += 1
            if isinstance(ex, RampingArrivalRate):
                self.progress.stage = stage_at(ex.stages, offset)
            pool = idle.setdefault(id(runtime), [])
            if pool:
                client = pool.pop()
            elif allocated < max_vus:
                client, allocated = runtime.new_client(), allocated + 1
                pool.extend([client] * (runtime.lanes - 1))
            elif (spare := self._idle_elsewhere(runtime)) is not None:
                spare.close()  # re-purpose an idle VU of another class: the weights hold, max_vus too
                client = runtime.new_client()
                pool.extend([client] * (runtime.lanes - 1))
            else:
                self.recorder.dropped(runtime.key, self.clock(), due >= self.measure_from_ns)
                continue
            self.progress.vus = allocated
            self.progress.dispatched += 1
            self._spawn(self._open_iteration(client, runtime, due, pool))

    def _idle_elsewhere(self, runtime: ClassRuntime) -> Client | None:
        for key, pool in self._idle.items():
            if key != id(runtime) and pool:
                client = pool.pop()
                if client not in pool:  # a WebSocket VU is free only when all its lanes are
                    return client
                pool.append(client)
        return None

    async def _open_iteration(self, client: Client, runtime: ClassRuntime, due: int, pool: list[Client]) -> None:
        try:
            await self.iterate(client, runtime, due)
        except asyncio.CancelledError:
            client.close()
            raise
        pool.append(client)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None and self.swarm.failure is None:
            self.swarm.failure = exc  # peers' failures are outcomes; an exception here is our own bug
            self.swarm.stop()

    async def _wait_tasks_until(self, deadline: int) -> None:
        """Until every spawned iteration ended, ``deadline`` passed, or a stop request."""
        stop_waiter = asyncio.ensure_future(self.swarm.wait_stopped())
        try:
            while self._tasks and not self.swarm.stopped:
                left_s = (deadline - self.clock()) / NS
                if left_s <= 0:
                    return
                await asyncio.wait([*self._tasks, stop_waiter], timeout=left_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_waiter.cancel()

    async def _drain(self) -> None:
        """Wait ``graceful_stop`` for iterations in flight (none on a stop request), then cancel them."""
        await self._wait_tasks_until(self.clock() + int(self.spec.graceful_stop * NS))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
