"""infer-bench: load tests and benchmarks for streaming inference servers."""

from infer_bench.errors import (
    ConfigError,
    InferBenchError,
    RunAborted,
    ScenarioError,
    TargetUnreachable,
    ThresholdsFailed,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InferBenchError",
    "RunAborted",
    "ScenarioError",
    "TargetUnreachable",
    "ThresholdsFailed",
    "UsageError",
    "__version__",
]
