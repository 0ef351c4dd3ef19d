"""The ``infer-bench`` command line. Thin: parse, call, and map errors to exit codes.

Exit codes: 0 ok · 1 thresholds or gate failed · 2 usage, scenario or config error · 3 run aborted or
target unreachable. Heavy modules are imported inside commands so ``infer-bench --help`` starts fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from infer_bench.errors import ConfigError, InferBenchError, RunAborted, ThresholdsFailed, UsageError

if TYPE_CHECKING:
    from infer_bench.runner import ShardPart

app = typer.Typer(
    name="infer-bench",
    help="Load tests and benchmarks for streaming inference servers, with a reference batching server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(exc: InferBenchError) -> NoReturn:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(exc.exit_code)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="server.yaml; flags override it")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port; 0 picks a free one (default: 8000)")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes (default: 1)")] = None,
    model: Annotated[str | None, typer.Option(help="Default generation model (default: tokens)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Largest /predict batch (default: 32)")] = None,
    batch_timeout_ms: Annotated[
        float | None,
        typer.Option(help="Longest wait of the oldest queued request; 0 = opportunistic (default: 0)"),
    ] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Sequences decoded per step (default: 64)")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Waiting requests before 503 (default: 1024)")] = None,
    log_level: Annotated[str | None, typer.Option(help="uvicorn log level (default: warning)")] = None,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue",
            help="Where generation jobs queue: memory:// in-process (default), redis://HOST:PORT/DB for "
            "`infer-bench worker`s",
        ),
    ] = None,
    direct: Annotated[
        bool, typer.Option("--direct", help="No queue: requests run on the engines in their route (direct mode)")
    ] = False,
) -> None:
    """Start the reference server: HTTP, SSE, WebSocket and OpenAI-compatible routes over simulated models."""
    from reference_server import errors as server_errors
    from reference_server.serve import run
    from reference_server.settings import load_settings

    try:
        settings = load_settings(
            config, host=host, port=port, workers=workers, model=model, batch_size=batch_size,
            batch_timeout_ms=batch_timeout_ms, max_num_seqs=max_num_seqs, max_queue=max_queue,
            log_level=log_level, queue_url=queue,
        )  # fmt: skip
    except server_errors.ConfigError as exc:
        _fail(ConfigError(str(exc)))
    if direct:
        if queue is not None:
            _fail(ConfigError("--direct and --queue exclude each other: direct mode has no queue"))
        settings = settings.model_copy(update={"queue_url": None})

    def announce(url: str) -> None:
        summary = (
            f"models={','.join(m.name for m in settings.models)} default={settings.model} "
            f"batch_size={settings.batch_size} batch_timeout_ms={settings.batch_timeout_ms:g} "
            f"max_num_seqs={settings.max_num_seqs} max_queue={settings.max_queue} workers={settings.workers} "
            f"queue={settings.queue_url or 'none (direct)'}"
        )
        print(f"infer-bench reference server on {url}", flush=True)
        print(summary, flush=True)

    try:
        run(settings, announce)
    except OSError as exc:  # the port is taken, or the address cannot be bound
        _fail(ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"))


@app.command()
def worker(
    queue: Annotated[str, typer.Option("--queue", help="redis://HOST:PORT/DB of the job queue")],
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Queue consumers in this process")] = 1,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="server.yaml: models, batch size")] = None,
    name: Annotated[
        str | None, typer.Option(help="Consumer name (default: HOST-PID); a stable name re-reads its pending jobs")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(min=0.001, help="Jobs a second this process takes (token bucket)")
    ] = None,
    grace_s: Annotated[float, typer.Option(min=0, help="On SIGTERM, how long a running batch may finish")] = 10.0,
) -> None:
    """Run queue workers: take generation jobs from Redis Streams, stream their tokens back, survive crashes."""
    from reference_server import errors as server_errors
    from reference_server.queue.worker_main import WorkerOptions, run_worker
    from reference_server.settings import load_settings

    try:
        settings = load_settings(config, queue_url=queue)
    except server_errors.ConfigError as exc:
        _fail(ConfigError(str(exc)))
    if queue.startswith("memory://"):
        _fail(ConfigError("--queue memory:// is in-process: its workers run inside `infer-bench serve`"))
    options = WorkerOptions(queue, concurrency, name, rate, grace_s, settings.queue_prefix)
    run_worker(settings, options, lambda line: print(line, flush=True))


@app.command()
def probe(
    url: Annotated[str | None, typer.Argument(help="Target base URL; omit to start the embedded server")] = None,
    protocol: Annotated[str, typer.Option(help="sse (/v1/stream) or openai (/v1/chat/completions)")] = "sse",
    prompt: Annotated[str, typer.Option(help="Prompt text")] = "Tell me about streaming inference",
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to ask for")] = 32,
    model: Annotated[str, typer.Option(help="Model name for the openai protocol")] = "tokens",
) -> None:
    """Stream one request and show its tokens, TTFT and inter-token gaps: is the target up and speaking?"""
    from contextlib import ExitStack

    from rich.console import Console

    from infer_bench.probe import probe as run_probe

    console = Console(highlight=False)
    with ExitStack() as stack:
        if url is None:
            from reference_server.serve import EmbeddedServer

            url = stack.enter_context(EmbeddedServer()).url
            console.print(f"[dim]started the embedded reference server on {url}[/]")
        result = run_probe(
            url, protocol=protocol, prompt=prompt, max_tokens=max_tokens, model=model,
            on_token=lambda t: console.print(t, end="", markup=False),
        )  # fmt: skip
    console.print()
    gaps = sorted(result.gaps_s)
    itl = f"{gaps[len(gaps) // 2] * 1000:.2f} ms median, {gaps[-1] * 1000:.2f} ms max" if gaps else "n/a"
    ttft = f"{result.ttft_s * 1000:.2f} ms" if result.ttft_s is not None else "no token received"
    console.print(
        f"[bold]{len(result.tokens)} tokens[/] · TTFT {ttft} · ITL {itl} · "
        f"total {result.e2e_s * 1000:.1f} ms · finish {result.finish or 'unknown'}"
    )
    if not result.tokens:
        raise RunAborted(f"{result.url} answered but streamed no tokens")


def _env(pairs: list[str]) -> dict[str, str]:
    import os

    env = dict(os.environ)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-e {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


@app.command()
def run(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML)")],
    out: Annotated[
        list[str] | None,
        typer.Option(
            "--out",
            "-o",
            help="Result file (default: results/<scenario>-<time>.json); or FORMAT=FILE for a report as well "
            "(markdown, json, junit, html, hlog, text); repeatable",
        ),
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for ${KEY} in the file")] = None,
    seed: Annotated[int, typer.Option(help="Seed for prompts, class picks and behaviours")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="Accept any TLS certificate (self-signed)")] = False,
    no_thresholds: Annotated[
        bool, typer.Option("--no-thresholds", help="Neither check the scenario's thresholds nor abort on them")
    ] = False,
    processes: Annotated[
        str | None,
        typer.Option(
            "--processes", "-p", help="Split the run into N shards in N processes (auto: one per core but one)"
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run the shards as Ray actors, one per CPU (-p N: N of them): ADDRESS of a cluster, auto (the one "
            "`ray start` made here) or local (a new one on this machine); needs infer-bench[ray]",
        ),
    ] = None,
    shard: Annotated[str | None, typer.Option("--shard", hidden=True, help="i/N: run one shard (internal)")] = None,
    start_at: Annotated[int | None, typer.Option("--start-at", hidden=True, help="Shard start, epoch ns")] = None,
    target_url: Annotated[str | None, typer.Option("--target-url", hidden=True, help="Resolved target")] = None,
    progress_file: Annotated[Path | None, typer.Option("--progress-file", hidden=True, help="Shard progress")] = None,
) -> None:
    """Run a scenario: drive the client swarm, show live progress, print a summary, write a result file."""
    from datetime import datetime

    from rich.console import Console

    from infer_bench.report.summary import print_summary
    from infer_bench.scenario import load_scenario

    result_path, reports = _outputs(out or [])
    part = _shard_part(shard, start_at, target_url, progress_file)
    count = 1
    if processes is not None:
        from infer_bench.processes import process_count

        count = process_count(processes)
        if part is not None:
            raise UsageError("--processes and --shard: a shard does not split again")
    spec = load_scenario(scenario, _env(env or []))
    if result_path is None:
        Path("results").mkdir(exist_ok=True)
        result_path = Path("results") / f"{scenario.stem}-{datetime.now():%Y%m%d-%H%M%S}.json"
    console = Console(stderr=True)
    if ray_address is not None:
        from infer_bench.ray_shards import run_ray

        if part is not None:
            raise UsageError("--ray and --shard: a shard does not split again")
        result, code = run_ray(
            spec, ray_address, count if processes is not None else None, out=result_path, seed=seed,
            verify_tls=not insecure, check_thresholds=not no_thresholds,
            progress=None if quiet else lambda line: console.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True),
        )  # fmt: skip
    elif count > 1:
        from infer_bench.processes import ChildArgs, run_processes

        args = ChildArgs(str(scenario), tuple(env or ()), seed, insecure, no_thresholds)

        def progress(line: str) -> None:
            console.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True)

        result, code = run_processes(
            spec, args, count, out=result_path, verify_tls=not insecure, check_thresholds=not no_thresholds,
            progress=None if quiet else progress,
        )  # fmt: skip
    else:
        from infer_bench.report.live import LiveView
        from infer_bench.runner import run_scenario

        with LiveView(console) if not quiet else _nothing() as live:
            result, code = run_scenario(
                spec, out=result_path, live=live, seed=seed, verify_tls=not insecure,
                check_thresholds=not no_thresholds, part=part,
            )  # fmt: skip
    print_summary(result, Console() if sys.stdout.isatty() else Console(width=140))  # logs: room for tables
    out_path = result_path
    Console(stderr=True).print(f"[dim]result written to {out_path}[/]")
    if reports:
        from infer_bench.report.formats import render_report
        from infer_bench.result import load_result

        written = load_result(out_path)  # as a report of the file reads it, so both say the same
        for fmt, path in reports:
            path.write_text(render_report(fmt, [written]), encoding="utf-8")
            Console(stderr=True).print(f"[dim]{fmt} report written to {path}[/]")
    if code == 3:
        raise RunAborted(f"the run stopped early ({result['stop_reason']}); the partial result is in {out_path}")
    if code == 1:
        failed = [f"{t['metric']} {t['expression']}" for t in result["thresholds"] if not t["ok"]]
        raise ThresholdsFailed(f"{len(failed)} threshold(s) failed: {'; '.join(failed)}")


def _shard_part(
    shard: str | None, start_at: int | None, target_url: str | None, progress_file: Path | None
) -> ShardPart | None:
    """The internal options a ``--processes`` parent gives its children, checked together."""
    if shard is None:
        return None
    from infer_bench.runner import ShardPart
    from infer_bench.shard import Shard

    if start_at is None or target_url is None:
        raise UsageError("--shard needs --start-at and --target-url (they are set by --processes)")
    try:
        parsed = Shard.parse(shard)
    except ValueError as exc:
        raise UsageError(f"--shard: {exc}") from None
    return ShardPart(parsed, start_at, target_url, progress_file)


def _outputs(values: list[str]) -> tuple[Path | None, list[tuple[str, Path]]]:
    """``-o`` values: at most one result path, and any number of FORMAT=FILE reports."""
    from infer_bench.report.formats import FORMATS

    result: Path | None = None
    reports: list[tuple[str, Path]] = []
    for value in values:
        fmt, sep, file = value.partition("=")
        if sep and fmt in FORMATS:
            if not file:
                raise UsageError(f"--out {value}: expected {fmt}=FILE")
            reports.append((fmt, Path(file)))
        elif result is not None:
            raise UsageError(f"--out {value}: the result file is already {result}; reports are FORMAT=FILE")
        else:
            result = Path(value)
    for _, path in reports:
        if not path.parent.is_dir():
            raise UsageError(f"--out {path}: the directory {path.parent} does not exist")
    return result, reports


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@app.command()
def validate(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (YAML)")],
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for ${KEY} in the file")] = None,
) -> None:
    """Check a scenario file without running it; errors name the file, line and field."""
    from infer_bench.runner import check_reference_settings
    from infer_bench.scenario import load_scenario

    spec = load_scenario(scenario, _env(env or []))
    check_reference_settings(spec)
    for name, s in spec.scenarios.items():
        classes = ", ".join(f"{c.name} ({c.protocol}, weight {c.weight:g})" for c in s.classes)
        print(f"{scenario}: {name}: {s.executor.kind}, {s.executor.total_duration():g} s; classes: {classes}")
    if spec.thresholds:
        print(f"{scenario}: thresholds: {'; '.join(t.label for t in spec.thresholds)}")
    if spec.gates:
        print(f"{scenario}: gates: {', '.join(rule.label for rule in spec.gates)}")
    print(f"{scenario}: valid")


def _load_results(paths: list[Path]) -> list[dict[str, Any]]:
    from infer_bench.result import load_result

    return [load_result(path) for path in paths]


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        print(f"written to {output}", file=sys.stderr)


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="Result files (several overlay in html, tag in hlog)")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="text, markdown, json, junit, html (one file, offline) or hlog")
    ] = "text",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")] = None,
) -> None:
    """Render result files: the summary again, Markdown for CI, JSON figures, JUnit, HTML plots, HDR logs."""
    from infer_bench.report.formats import render_report

    loaded = _load_results(results)
    if fmt == "text" and output is None and sys.stdout.isatty():
        from rich.console import Console

        from infer_bench.report.summary import print_summary

        for result in loaded:
            print_summary(result, Console())
        return
    _emit(render_report(fmt, loaded), output)


def _names(baseline: Path, current: Path) -> tuple[str, str]:
    if baseline.stem != current.stem:
        return baseline.stem, current.stem
    return "baseline", "current"


@app.command()
def compare(
    baseline: Annotated[Path, typer.Argument(help="The result to compare against")],
    current: Annotated[Path, typer.Argument(help="The new result")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="text or markdown")] = "text",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")] = None,
) -> None:
    """Two runs side by side: every figure with its change, and warnings when runs are not comparable."""
    from infer_bench.compare import compare_results
    from infer_bench.report.comparison import comparison_markdown, render_comparison

    base, cur = _load_results([baseline, current])
    comparison = compare_results(base, cur)
    names = _names(baseline, current)
    if fmt == "markdown":
        _emit(comparison_markdown(comparison, names), output)
    elif fmt == "text":
        _emit(_rendered(render_comparison(comparison, names), output), output)
    else:
        raise UsageError(f"--format {fmt}: compare writes text or markdown")


def _rendered(renderable: object, output: Path | None) -> str:
    import io

    from rich.console import Console

    if output is None and sys.stdout.isatty():
        Console().print(renderable)
        return ""
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None, highlight=False).print(renderable)
    return buffer.getvalue()


@app.command()
def gate(
    baseline: Annotated[Path, typer.Argument(help="The stored baseline result")],
    current: Annotated[Path, typer.Argument(help="The new result")],
    max_regression: Annotated[
        list[str] | None,
        typer.Option(
            "--max-regression",
            "-r",
            help="FIGURE=BUDGET, e.g. ttft.p99=10%, itl.p50=+2ms, throughput=-5% (default: the scenario's gates:)",
        ),
    ] = None,
    confidence: Annotated[
        float | None, typer.Option(min=0.5, max=0.999, help="Interval a change must leave to count (default 0.95)")
    ] = None,
    resamples: Annotated[int, typer.Option(min=100, max=100_000, help="Bootstrap draws per rule")] = 1000,
    fmt: Annotated[str, typer.Option("--format", "-f", help="text or markdown")] = "text",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")] = None,
) -> None:
    """Exit 1 when CURRENT regresses beyond a budget against BASELINE by more than run-to-run noise."""
    from infer_bench.gate import decide, rules_of
    from infer_bench.report.comparison import gate_markdown, render_gate
    from infer_bench.scenario.gates import GateSyntaxError, parse_gate_option

    base, cur = _load_results([baseline, current])
    if max_regression:
        try:
            rules = [parse_gate_option(text) for text in max_regression]
        except GateSyntaxError as exc:
            raise UsageError(f"--max-regression: {exc}") from None
        level = 0.95
    else:
        rules, level = rules_of(cur)
        if not rules:
            raise UsageError(
                f"no rules: give --max-regression FIGURE=BUDGET, or a gates: block in {current}'s scenario"
            )
    decisions = decide(base, cur, rules, confidence=confidence or level, resamples=resamples)
    names = _names(baseline, current)
    if fmt == "markdown":
        _emit(gate_markdown(decisions, names), output)
    elif fmt == "text":
        _emit(_rendered(render_gate(decisions, names), output), output)
    else:
        raise UsageError(f"--format {fmt}: gate writes text or markdown")
    from infer_bench.compare import comparability

    for warning in comparability(base, cur)[0]:
        print(f"warning: {warning}", file=sys.stderr)
    regressed = [d.rule.label for d in decisions if d.regressed]
    if regressed:
        raise ThresholdsFailed(f"regression beyond budget and noise: {', '.join(regressed)}")


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep file (YAML): scenario, grid of server settings, loads")],
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for ${KEY} in the files")] = None,
) -> None:
    """Run a scenario against every setting of a grid and load: the table, frontier and recommended setting.

    Results go to the sweep directory (one file per cell, sweep.json, sweep.html); cells already done are
    kept, so an interrupted sweep resumes. Exit 1 when no setting kept the scenario's thresholds.
    """
    from rich.console import Console

    from infer_bench.scenario import load_scenario
    from infer_bench.sweep import SweepRunner, check_scenario, load_sweep
    from infer_bench.sweep.execute import check_settings
    from infer_bench.sweep.report import print_sweep, render_sweep_html

    variables = _env(env or [])
    plan = load_sweep(sweep_file, variables)
    scenario = load_scenario(plan.scenario_path, variables)
    check_scenario(scenario, plan)
    check_settings(scenario, plan)
    console = Console(stderr=True)
    cells = len(plan.settings) * len(plan.loads)
    console.print(
        f"[bold]sweep[/] {len(plan.settings)} setting(s) × {len(plan.loads)} load(s) = {cells} cell(s)"
        + (" + a capacity search per setting" if plan.capacity else "")
        + f" → {plan.out_dir}",
        highlight=False,
    )

    def progress(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    result = SweepRunner(plan, scenario, progress=progress).run()
    summary = result.to_json(plan)
    (plan.out_dir / "sweep.html").write_text(render_sweep_html(summary), encoding="utf-8")
    print_sweep(summary, Console() if sys.stdout.isatty() else Console(width=140))
    console.print(f"[dim]results in {plan.out_dir} (sweep.json, sweep.html, cells/)[/]")
    if result.interrupted:
        raise RunAborted(f"the sweep was interrupted; finished cells are kept in {plan.out_dir}")
    if summary["recommendation"] is None:
        raise ThresholdsFailed("no setting kept the scenario's thresholds at any load")


@app.command()
def calibrate(
    protocol: Annotated[str, typer.Option(help="http, sse, websocket or openai")] = "sse",
    quick: Annotated[bool, typer.Option("--quick", help="A coarser search, about 30 s (default: under 3 min)")] = False,
) -> None:
    """Find this machine's per-process client ceiling and the tool's own TTFT/ITL overhead below it."""
    from infer_bench.calibrate import run_calibration

    run_calibration(protocol, quick=quick)


@app.command()
def schema() -> None:
    """Print the JSON Schema of scenario files, for editor autocompletion."""
    import json

    from infer_bench.scenario import scenario_json_schema

    print(json.dumps(scenario_json_schema(), indent=2))


@app.command()
def version() -> None:
    """Print the infer-bench version."""
    from infer_bench import __version__

    print(__version__)


def main() -> None:
    try:
        app()
    except InferBenchError as exc:  # commands raise; this is the one place that maps to exit codes
        _fail(exc)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
