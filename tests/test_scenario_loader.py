"""Scenario files: the bad corpus fails with located messages, the good one loads and normalises.

Each file in ``tests/scenarios/bad/`` starts with two comments, read here:

    # expect: <a substring of the error message>
    # line: <the line the message must start with, or "none">
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from infer_bench.errors import ScenarioError
from infer_bench.scenario import (
    Behavior,
    ConstantArrivalRate,
    ConstantVUs,
    HttpRequest,
    OpenAIRequest,
    PerVUIterations,
    PromptSource,
    RampingArrivalRate,
    RampingVUs,
    Scenario,
    ScenarioSpec,
    SharedIterations,
    SSERequest,
    Stage,
    ThinkTime,
    UserClass,
    WebSocketRequest,
    format_duration,
    load_scenario,
    parse_duration,
    parse_scenario,
    scenario_json_schema,
)
from infer_bench.scenario.diagnostics import MAX_SHOWN, InvalidScenario
from infer_bench.scenario.executors import describe
from infer_bench.scenario.targets import is_loopback
from infer_bench.scenario.variables import substitute

CORPUS = Path(__file__).parent / "scenarios"
BAD = sorted((CORPUS / "bad").glob("*.yaml"))
GOOD = sorted((CORPUS / "good").glob("*.yaml"))


def _expectation(path: Path) -> tuple[str, str]:
    first, second = path.read_text(encoding="utf-8").splitlines()[:2]
    expect = re.fullmatch(r"# expect: (.+)", first)
    line = re.fullmatch(r"# line: (\d+|none)", second)
    assert expect, f"{path.name} must start with a '# expect: <message substring>' comment"
    assert line, f"{path.name} must have a '# line: <number or none>' comment second"
    return expect[1], line[1]


# --- the bad corpus ------------------------------------------------------------------------------


def test_the_bad_corpus_is_large_enough() -> None:
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_scenario_fails_with_a_located_message(path: Path) -> None:
    expected, line = _expectation(path)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path, env={})
    message = str(caught.value)
    assert expected in message
    prefix = re.escape(str(path)) + (r"[: ]" if line == "none" else rf":{line}[: ]")
    assert re.match(prefix, message), f"expected the message to start with {path}:{line}, got: {message}"
    assert caught.value.exit_code == 2
    assert "pydantic" not in message
    assert "Traceback" not in message
    assert len(message.splitlines()) <= MAX_SHOWN + 1


def test_at_most_five_problems_are_listed_then_a_count() -> None:
    message = _error((CORPUS / "bad" / "many_errors.yaml").read_text())
    lines = message.splitlines()
    assert len(lines) == MAX_SHOWN + 1
    assert lines[-1] == "… and 2 more"
    numbers = [int(re.match(r"<scenario>:(\d+)", line)[1]) for line in lines[:-1]]  # type: ignore[index]
    assert numbers == sorted(numbers)


def _error(text: str, **kwargs: object) -> str:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


SMOKE = "target: reference\nscenarios:\n  chat:\n    executor: constant-vus\n    duration: 5s\n"


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        pytest.param(
            "    executor: constant-arrival-rate\n    rate: 1\n    pre_allocated_vus: 1\n    arrival: gaussian\n",
            "<scenario>:8 scenarios.chat.arrival: expected 'uniform' or 'poisson', got 'gaussian'",
            id="literal",
        ),
        pytest.param(
            "    executor: constant-vus\n    prompts: {file: ''}\n",
            "<scenario>:6 scenarios.chat.prompts.file: expected a non-empty string, got ''",
            id="empty-string",
        ),
        pytest.param(
            "    executor: constant-vus\n    prompts: {inline: []}\n",
            "scenarios.chat.prompts.inline: expected at least 1 item, got 0",
            id="empty-list",
        ),
        pytest.param(
            "    executor: constant-vus\n    request: {method: GET}\n",
            "scenarios.chat.request.method: unknown key 'method'; expected one of: body, headers, max_tokens, path",
            id="key-of-another-protocol",
        ),
        pytest.param(
            "    executor: constant-vus\n    protocol: http\n    request: {method: BREW}\n",
            "scenarios.chat.request.method: expected 'GET', 'POST', 'PUT', 'PATCH' or 'DELETE', got 'BREW'",
            id="http-method",
        ),
        pytest.param(
            "    executor: constant-vus\n    request: {path: v1/stream}\n",
            "scenarios.chat.request.path: expected a URL path starting with '/', got 'v1/stream'",
            id="url-path",
        ),
        pytest.param(
            "    executor: constant-vus\n    prompts: {inline: [a], format: csv}\n",
            "scenarios.chat.prompts.format: format applies only to a prompt file",
            id="format-without-file",
        ),
        pytest.param(
            "    executor: constant-vus\n    prompts: {synthetic: {words: {min: 9, max: 3}}}\n",
            "scenarios.chat.prompts.synthetic.words.max: min (9) > max (3)",
            id="word-range",
        ),
        pytest.param(
            "    executor: constant-vus\n    <<: [1]\n",
            "<scenario>:6 scenarios.chat: a merge key (<<) takes a mapping or a list of mappings",
            id="merge-non-mapping",
        ),
        pytest.param(
            "    executor: constant-vus\n    classes: []\n",
            "scenarios.chat.classes: expected at least 1 item, got 0",
            id="no-classes",
        ),
        pytest.param(
            "    executor: constant-vus\n    protocol: sse\n    behavior: {burst: {size: 3}}\n",
            "scenarios.chat.behavior.burst: missing required key 'every'",
            id="burst-without-every",
        ),
    ],
)
def test_problems_are_explained_in_the_words_of_the_format(tail: str, expected: str) -> None:
    text = "target: reference\nscenarios:\n  chat:\n    duration: 5s\n" + tail
    assert expected in _error(text)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b'["not an object"]\n', "p.jsonl line 1: expected a JSON object with a string 'prompt' field"),
        pytest.param(b'{"prompt": 3}\n', "p.jsonl line 1: expected a JSON object with a string 'prompt' field"),
        pytest.param(b"\xff\xfe\n", "prompt file 'p.jsonl' is not UTF-8 text"),
    ],
)
def test_malformed_jsonl_prompt_files_are_located(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "p.jsonl").write_bytes(content)
    message = _error(SMOKE + "    prompts: {file: p.jsonl}\n", base_dir=tmp_path)
    assert message.startswith("<scenario>:6 scenarios.chat.prompts.file: ")
    assert expected in message


def test_a_short_csv_row_is_located(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,prompt\n1,hello\n2\n")
    assert "p.csv line 3: no 'prompt' value" in _error(SMOKE + "    prompts: {file: p.csv}\n", base_dir=tmp_path)


@pytest.mark.parametrize("target", ["http://127.0.0.1:99999", "http://127.0.0.1:8000?x=1", "127.0.0.1:8000", "http://"])
def test_malformed_targets_are_refused(target: str) -> None:
    assert "expected 'reference' or a base URL" in _error(SMOKE.replace("reference", repr(target)))


def test_a_variable_holding_a_line_break_is_refused_to_keep_line_numbers() -> None:
    message = _error("target: ${TARGET}\n", env={"TARGET": "reference\nscenarios: {}"})
    assert message.startswith("<scenario>:1:9: variable TARGET holds a line break")


def test_a_missing_scenario_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"missing\.yaml: no such scenario file"):
        load_scenario(tmp_path / "missing.yaml")


def test_a_scenario_file_that_is_not_utf8_is_a_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SMOKE.replace("chat", "caf\xe9").encode("latin-1"))
    with pytest.raises(ScenarioError, match="not UTF-8 text"):
        load_scenario(path)


def test_an_inherited_value_is_reported_once_at_defaults() -> None:
    text = (
        "target: reference\ndefaults:\n  timeout: soon\nscenarios:\n"
        "  a: {executor: constant-vus, duration: 5s}\n  b: {executor: constant-vus, duration: 5s}\n"
    )
    assert _error(text) == "<scenario>:3 defaults.timeout: expected a duration like 500ms or 1m30s, got 'soon'"


def test_a_prompt_file_shared_by_classes_is_reported_once(tmp_path: Path) -> None:
    text = SMOKE + "    classes:\n      - prompts: {file: gone.txt}\n      - prompts: {file: gone.txt}\n"
    message = _error(text, base_dir=tmp_path)
    assert message.count("not found") == 1


# --- the good corpus -----------------------------------------------------------------------------

GOOD_ENV = {"UNIT": "request"}


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_good_scenario_loads_and_survives_a_json_round_trip(path: Path) -> None:
    scenario = load_scenario(path, env=GOOD_ENV)
    assert scenario.source == str(path)
    assert Scenario.model_validate_json(scenario.model_dump_json()) == scenario


def _good(name: str, env: dict[str, str] | None = None) -> Scenario:
    return load_scenario(CORPUS / "good" / name, env=GOOD_ENV if env is None else env)


def test_minimal_scenario_takes_every_default() -> None:
    scenario = _good("minimal.yaml")
    spec = scenario.scenarios["smoke"]
    assert scenario.target == "reference"
    assert scenario.reference == {}
    assert spec.executor == ConstantVUs(vus=1, duration=5.0)
    assert (spec.start_time, spec.graceful_stop, spec.warmup) == (0.0, 30.0, 0.0)
    assert spec.classes == (UserClass(name="default", request=SSERequest()),)
    (user_class,) = spec.classes
    assert user_class.protocol == "sse"
    assert user_class.prompts == PromptSource(kind="synthetic", words_min=8, words_max=32)
    assert user_class.think_time == ThinkTime(min=0, max=0)
    assert user_class.behavior == Behavior(burst_size=1, burst_every=0.0)
    assert user_class.timeout == 30.0
    assert scenario.duration() == 35.0


def test_an_inline_class_becomes_the_default_class_with_defaults_merged() -> None:
    scenario = _good("inline_and_defaults.yaml")
    assert scenario.reference == {"batch_size": 16}
    inline = scenario.scenarios["inline"]
    assert inline.tags == {"team": "search"}
    assert inline.warmup == 2.0
    assert inline.executor.total_duration() == 90.0
    (user_class,) = inline.classes
    assert user_class.name == "default"
    assert user_class.protocol == "openai"
    assert user_class.request == OpenAIRequest(api="completions", max_tokens=16)
    assert user_class.request.endpoint == "/v1/completions"
    assert user_class.timeout == 10.0
    assert user_class.think_time == ThinkTime(min=0.1, max=0.1)


def test_weighted_classes_take_defaults_only_for_keys_they_leave_out() -> None:
    chatty, native, sockets, plain = _good("inline_and_defaults.yaml").scenarios["weighted"].classes
    assert [c.name for c in (chatty, native, sockets, plain)] == ["chatty", "class1", "class2", "class3"]
    assert (chatty.weight, chatty.protocol, chatty.timeout) == (3.0, "openai", 10.0)
    assert chatty.think_time == ThinkTime(min=0.05, max=0.2)
    assert native.request == SSERequest(max_tokens=64, body={"seed": 7})
    assert (native.timeout, native.think_time.max) == (60.0, 0.1)
    assert native.behavior == Behavior(cancel_after_tokens=5, cancel_probability=0.25, read_delay=0.02, reconnect=True)
    assert sockets.request == WebSocketRequest(in_flight=4, message={"model": "tokens"})
    assert (sockets.behavior.burst_size, sockets.behavior.burst_every) == (5, 2.0)
    assert plain.request == HttpRequest(method="PUT", path="/predict", body=[1, 2, 3])


def test_cancel_probability_defaults_to_one_when_cancel_after_tokens_is_set() -> None:
    scenario = parse_scenario(SMOKE + "    behavior: {cancel_after_tokens: 3}\n")
    assert scenario.scenarios["chat"].classes[0].behavior.cancel_probability == 1.0


def test_k6_camel_case_options_are_accepted() -> None:
    scenario = _good("k6_aliases.yaml")
    assert scenario.target == "http://127.0.0.1:8000"
    opened = scenario.scenarios["open"]
    assert opened.executor == ConstantArrivalRate(
        rate=50, time_unit=2.0, duration=60.0, pre_allocated_vus=10, max_vus=40, arrival="poisson", seed=42
    )
    assert (opened.start_time, opened.graceful_stop) == (5.0, 0.0)
    assert scenario.scenarios["ramp"].executor == RampingArrivalRate(
        start_rate=5, pre_allocated_vus=4, max_vus=4, stages=(Stage(duration=30, target=20),)
    )
    assert scenario.scenarios["vus"].executor == RampingVUs(start_vus=2, stages=(Stage(duration=10, target=4),))
    assert scenario.scenarios["each"].executor == PerVUIterations(vus=2, iterations=3, max_duration=60)


def test_every_executor_reports_its_total_duration() -> None:
    scenarios = _good("all_executors.yaml").scenarios
    totals = {name: spec.executor.total_duration() for name, spec in scenarios.items()}
    assert totals == {
        "constant": 30.0,
        "ramping": 30.0,
        "per-vu": 600.0,
        "shared": 120.0,
        "arrival": 45.0,
        "ramping_arrival": 60.5,
    }
    assert scenarios["shared"].executor == SharedIterations(vus=5, iterations=100, max_duration=120)
    arrival = scenarios["arrival"].executor
    assert isinstance(arrival, ConstantArrivalRate)
    assert (arrival.time_unit, arrival.max_vus, arrival.arrival, arrival.seed) == (1.0, 20, "uniform", 0)


def test_executors_describe_themselves_in_one_line() -> None:
    lines = {name: describe(spec.executor) for name, spec in _good("all_executors.yaml").scenarios.items()}
    assert lines == {
        "constant": "constant-vus · 10 VUs · 30s",
        "ramping": "ramping-vus · 3 stages · 30s",
        "per-vu": "per-vu-iterations · 5 VUs × 20 iterations · 10m",
        "shared": "shared-iterations · 5 VUs · 100 iterations · 2m",
        "arrival": "constant-arrival-rate · 100 per 1s · 45s",
        "ramping_arrival": "ramping-arrival-rate · 2 stages · 1m0.5s",
    }


def test_variables_take_their_defaults_when_unset() -> None:
    scenario = _good("env.yaml", env={})
    spec = scenario.scenarios["chat"]
    assert scenario.target == "reference"
    assert spec.executor == ConstantVUs(vus=2, duration=5.0)
    assert spec.tags == {"run": "local", "price": "$5 per run"}
    request = spec.classes[0].request
    assert isinstance(request, OpenAIRequest)
    assert request.api_key is None  # ${API_KEY:-} is empty, which YAML reads as null


def test_variables_given_override_the_defaults() -> None:
    env = {"TARGET": "http://127.0.0.1:9000", "VUS": "7", "DURATION": "1m", "RUN_ID": "ci-42", "API_KEY": "sk-x"}
    scenario = _good("env.yaml", env=env)
    spec = scenario.scenarios["chat"]
    assert scenario.target == "http://127.0.0.1:9000"
    assert spec.executor == ConstantVUs(vus=7, duration=60.0)
    assert spec.tags["run"] == "ci-42"
    assert spec.classes[0].request == OpenAIRequest(api_key="sk-x")
    assert "sk-x" not in repr(spec.classes[0].request)


def test_prompt_files_are_read_relative_to_the_scenario_file() -> None:
    classes = {c.name: c.prompts for c in _good("prompt_files.yaml").scenarios["files"].classes}
    assert classes["jsonl"] == PromptSource(kind="file", prompts=("What is continuous batching?", "Explain TTFT."))
    assert classes["jsonl-field"] == PromptSource(
        kind="file", prompts=("first", "second", "third"), order="random", seed=3
    )
    assert classes["csv"].prompts == ("Why, and how?", "Plain question")
    assert classes["txt"].prompts == ("line one", "  line two  ", "line three")
    assert classes["typed"].prompts == ("only line",)
    assert classes["inline"] == PromptSource(kind="inline", prompts=("hello", "how are you?"), order="random")
    assert classes["synthetic"] == PromptSource(kind="synthetic", words_min=4, words_max=12, seed=9)
    assert (classes["fixed-words"].words_min, classes["fixed-words"].words_max) == (20, 20)


def test_prompt_files_resolve_against_base_dir_when_parsing_text() -> None:
    text = SMOKE + "    prompts: {file: prompts/lines.txt}\n"
    scenario = parse_scenario(text, base_dir=CORPUS / "good")
    assert scenario.scenarios["chat"].classes[0].prompts.prompts[0] == "line one"


def test_anchors_and_merge_keys_work_and_x_keys_are_ignored() -> None:
    scenarios = _good("anchors.yaml").scenarios
    assert scenarios["a"].executor == ConstantVUs(vus=3, duration=10.0)
    assert scenarios["b"].executor == ConstantVUs(vus=1, duration=20.0)
    assert scenarios["b"].graceful_stop == 2.0


def test_merged_keys_are_located_where_they_were_written() -> None:
    text = (
        "target: reference\nx-base: &base\n  executor: constant-vus\n  duration: never\n"
        "scenarios:\n  a:\n    <<: *base\n"
    )
    assert _error(text).startswith("<scenario>:4 scenarios.a.duration: expected a duration")


def test_yaml_keys_are_taken_as_written() -> None:
    scenario = parse_scenario(SMOKE + "    tags: {on: 'yes', 200: ok}\n")
    assert scenario.scenarios["chat"].tags == {"on": "yes", "200": "ok"}


# --- the spec built in code ----------------------------------------------------------------------


def test_spec_objects_check_their_invariants_when_built_in_code() -> None:
    assert ConstantArrivalRate(rate=1, duration=1, pre_allocated_vus=5).max_vus == 5
    with pytest.raises(ValidationError, match=r"max_vus \(2\) < pre_allocated_vus \(5\)"):
        ConstantArrivalRate(rate=1, duration=1, pre_allocated_vus=5, max_vus=2)
    with pytest.raises(ValidationError, match="impossible stages"):
        RampingVUs(stages=(Stage(duration=0, target=3),))
    with pytest.raises(ValidationError, match="warmup"):
        ScenarioSpec(name="s", executor=ConstantVUs(duration=1), warmup=1.5)
    with pytest.raises(ValidationError, match="a openai class needs a OpenAIRequest"):
        UserClass(name="c", protocol="openai", request=SSERequest())


def test_a_user_class_built_in_code_gets_its_protocols_template() -> None:
    user_class = UserClass.model_validate({"name": "c", "protocol": "websocket", "request": {"in_flight": 2}})
    assert user_class.request == WebSocketRequest(in_flight=2)
    assert UserClass.model_validate({"name": "c", "protocol": "openai"}).request == OpenAIRequest()


def test_spec_models_are_frozen() -> None:
    spec = ConstantVUs(duration=1)
    with pytest.raises(ValidationError):
        spec.vus = 3  # type: ignore[misc]


# --- durations, variables, targets, schema -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("250us", 250e-6),
        ("1h2m3s", 3723.0),
        ("30", 30.0),
        (" 10s ", 10.0),
        (0, 0.0),
        (1.25, 1.25),
    ],
)
def test_durations_parse_to_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "message"), [("fast", "like 500ms"), ("-5s", ">= 0"), (-1, ">= 0"), ("5 s", "like")])
def test_bad_durations_are_refused(text: str | float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (0.00025, "250us"), (0.5, "500ms"), (1.5, "1.5s"), (90, "1m30s"), (7200, "2h")]
)
def test_durations_format_readably(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_formatted_durations_parse_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-5, abs=1e-9)


def test_substitution_escapes_and_leaves_comment_lines_alone() -> None:
    text = "a: $$HOME ${A:-x} $5\n# ${UNSET}\nb: ${B}\n"
    assert substitute(text, {"B": "2", "A": ""}) == "a: $HOME x $5\n# ${UNSET}\nb: 2\n"


@given(st.text(alphabet="ab$:{}-\n #", max_size=60))
def test_substitution_keeps_line_numbers(text: str) -> None:
    try:
        result = substitute(text, {"a": "x", "b": ""})
    except InvalidScenario:  # refusing is fine; changing the line structure is not
        return
    assert result.count("\n") == text.count("\n")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_only_loopback_hosts_are_targets(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_ipv6_loopback_url_is_a_valid_target() -> None:
    scenario = parse_scenario(SMOKE.replace("reference", "ws://[::1]:8000"))
    assert scenario.target == "ws://[::1]:8000"


def test_json_schema_describes_the_file_format() -> None:
    schema = scenario_json_schema()
    json.dumps(schema)  # serialisable
    assert schema["required"] == ["target", "scenarios"]
    assert schema["additionalProperties"] is False
    entry = schema["$defs"]["ConstantArrivalRateEntry"]
    assert {"preAllocatedVUs", "maxVUs", "timeUnit", "protocol", "request", "prompts"} <= set(entry["properties"])
    assert "max_vus" not in entry["required"]
    assert "classes" not in entry["required"]
    assert entry["properties"]["duration"]["anyOf"][0]["type"] == "string"
    duration_pattern = re.compile(entry["properties"]["duration"]["anyOf"][0]["pattern"])
    assert all(duration_pattern.match(text) for text in ("500ms", "1m30s", "1.5s", "250us"))
    assert not duration_pattern.match("fast")
    assert {"OpenAIRequest", "SSERequest", "WebSocketRequest", "HttpRequest"} <= set(schema["$defs"])
