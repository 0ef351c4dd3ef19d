"""Server settings (file + flags, located errors) and the simulated models' determinism and costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from reference_server.errors import ConfigError
from reference_server.models import EchoModel, TokensModel
from reference_server.settings import EchoModelSpec, TokensModelSpec, load_settings


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("batch_size: 16\nmax_queue: 50\n")
    settings = load_settings(config, batch_size=4, max_queue=None)
    assert (settings.batch_size, settings.max_queue, settings.max_num_seqs) == (4, 50, 64)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "batch_size: -3\n",
            "server.yaml: batch_size: Input should be greater than or equal to 1, got -3",
            id="negative-number",
        ),
        pytest.param("batch_sise: 3\n", "server.yaml: batch_sise: Extra inputs are not permitted", id="unknown-key"),
        pytest.param(
            "models:\n  - kind: tokens\n    base_ms: fast\n",
            "server.yaml: models.0.tokens.base_ms:",
            id="nested-model-field",
        ),
        pytest.param("- 1\n- 2\n", "server.yaml: expected a mapping of settings, got list", id="not-a-mapping"),
        pytest.param("batch_size: [\n", "server.yaml: not valid YAML", id="yaml-syntax"),
        pytest.param("model: echo\n", "server.yaml: model: expected the name of a tokens model", id="wrong-default"),
        pytest.param(
            "models:\n  - kind: echo\n  - kind: echo\n  - kind: tokens\n",
            "each name and version must be listed once",
            id="duplicate-names",
        ),
    ],
)
def test_bad_settings_files_name_the_file_and_the_field(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert expected in str(error.value).replace(str(tmp_path) + "/", "")


def test_a_missing_settings_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the settings file"):
        load_settings(tmp_path / "absent.yaml")


def test_tokens_are_a_function_of_prompt_request_seed_and_model_seed() -> None:
    def tokens(prompt: str, seed: int | None, model_seed: int = 0) -> list[str]:
        model = TokensModel(TokensModelSpec(seed=model_seed))
        plan = model.plan(prompt, 16, seed)
        return [model.next_token(plan) for _ in range(plan.output_tokens)]

    assert tokens("hello world", 1) == tokens("hello world", 1)
    assert tokens("hello world", 1) != tokens("hello world", 2)
    assert tokens("hello world", 1) != tokens("hello there", 1)
    assert tokens("hello world", 1) != tokens("hello world", 1, model_seed=3)


def test_output_length_is_max_tokens_when_given_else_drawn_from_the_configured_range() -> None:
    model = TokensModel(TokensModelSpec(output_tokens={"min": 5, "max": 9}, max_tokens_limit=100))
    assert (model.plan("p", 40, None).output_tokens, model.plan("p", 40, None).finish_reason) == (40, "length")
    assert model.plan("p", 10_000, None).output_tokens == 100
    drawn = {model.plan(f"prompt {i}", None, None).output_tokens for i in range(200)}
    assert drawn == set(range(5, 10))
    assert model.plan("p", None, None).finish_reason == "stop"


def test_fault_rates_select_about_that_share_of_requests() -> None:
    model = TokensModel(TokensModelSpec(fail_rate=0.25, stall_rate=0.0))
    failing = sum(model.plan(f"prompt {i}", 50, None).fail_at is not None for i in range(2000))
    assert 400 <= failing <= 600  # binomial(2000, 0.25): mean 500, sd ~19; deterministic anyway (seeded)


def test_enabling_faults_does_not_change_the_tokens_of_healthy_requests() -> None:
    plain, faulty = TokensModel(TokensModelSpec()), TokensModel(TokensModelSpec(fail_rate=0.5))
    for i in range(20):
        a, b = plain.plan(f"p{i}", 8, None), faulty.plan(f"p{i}", 8, None)
        if b.fail_at is None:
            assert [plain.next_token(a) for _ in range(8)] == [faulty.next_token(b) for _ in range(8)]


def test_costs_follow_the_documented_formulas() -> None:
    tokens = TokensModel(TokensModelSpec(base_ms=5, per_seq_ms=0.5, prefill_ms=2, per_input_token_ms=0.1))
    assert tokens.step_cost_s(10) == pytest.approx(0.010)
    assert tokens.prefill_cost_s(30) == pytest.approx(0.005)
    echo = EchoModel(EchoModelSpec(base_ms=1, per_item_ms=0.25))
    assert echo.batch_cost_s(8) == pytest.approx(0.003)
    assert echo.predict_batch([1, "a", [2.0]]) == [1, "a", [2.0]]
