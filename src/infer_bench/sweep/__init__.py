"""Sweeps: the same scenario against a grid of server settings and loads, and what they conclude."""

from infer_bench.sweep.analysis import Capacity, CellFigures, Recommendation, find_capacity, pareto_frontier, recommend
from infer_bench.sweep.execute import SweepResult, SweepRunner, check_scenario
from infer_bench.sweep.spec import Setting, Sweep, load_sweep, parse_sweep

__all__ = [
    "Capacity",
    "CellFigures",
    "Recommendation",
    "Setting",
    "Sweep",
    "SweepResult",
    "SweepRunner",
    "check_scenario",
    "find_capacity",
    "load_sweep",
    "pareto_frontier",
    "parse_sweep",
    "recommend",
]
