"""Errors of the infer-bench tool, each carrying the exit code the CLI ends with.

    InferBenchError              (exit 2 unless a subclass says otherwise)
    ├── UsageError           2   a flag or argument is wrong
    ├── ScenarioError        2   a scenario file is invalid; the message names file, line and field
    ├── ConfigError          2   a server settings file or flag is invalid
    ├── ThresholdsFailed     1   the run finished but a threshold or regression gate failed
    └── RunAborted           3   the run could not start or did not finish
        └── TargetUnreachable  3   the target server did not answer

Exit codes (documented in the README): 0 ok, 1 thresholds or gate failed, 2 usage or scenario error,
3 run aborted or target unreachable.
"""

from __future__ import annotations


class InferBenchError(Exception):
    exit_code: int = 2


class UsageError(InferBenchError):
    exit_code = 2


class ScenarioError(InferBenchError):
    exit_code = 2


class ConfigError(InferBenchError):
    exit_code = 2


class ThresholdsFailed(InferBenchError):
    exit_code = 1


class RunAborted(InferBenchError):
    exit_code = 3


class TargetUnreachable(RunAborted):
    exit_code = 3
