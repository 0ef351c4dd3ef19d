"""This machine's calibration: where one infer-bench process stops measuring truly, and what a run makes of it.

``infer-bench calibrate`` (``infer_bench.calibrate``) measures, per protocol, the highest request rate one
process sends on schedule with CPU to spare (its *ceiling*) and its own overhead on TTFT and ITL below
it. The record is kept in the user's cache directory, one entry per machine, CPU, Python and infer-bench
version (a faster release or another interpreter must calibrate again)::

    $XDG_CACHE_HOME/infer-bench/calibration.json   (default ~/.cache/infer-bench/calibration.json)
    {schema: infer-bench.calibration, version: 1,
     machines: {<key>: {<protocol>: {ceiling_rate, limited_by, verdict, measured_at, mode, bounds,
                                      probes: [...], overhead: [...]}}}}

A run reads it (``range_warnings``) and says plainly when it sent more per process than the ceiling of
its protocols: its latencies then include the client's own queueing.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from infer_bench import __version__
from infer_bench.result import cpu_model

SCHEMA = "infer-bench.calibration"
VERSION = 1
OVER_SECONDS = 2
"""Seconds above the ceiling that make a run untrustworthy: one busy second at a start is not a pattern."""


def cache_path(env: Mapping[str, str] | None = None) -> Path:
    """Where calibrations live: ``$XDG_CACHE_HOME/infer-bench`` or ``~/.cache/infer-bench``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "infer-bench" / "calibration.json"


def machine_key() -> str:
    """What a calibration holds for: host, CPU model and count, Python, infer-bench version."""
    return " | ".join((
        platform.node() or "unknown host", cpu_model(), f"{os.cpu_count() or 0} CPUs",
        f"{platform.python_implementation()} {platform.python_version()}", f"infer-bench {__version__}",
    ))  # fmt: skip


def load_calibrations(path: Path | None = None, key: str | None = None) -> dict[str, dict[str, Any]]:
    """This machine's calibrations by protocol; empty when there are none or the file is unreadable.

    A damaged cache never stops a run: it only loses the range check.
    """
    try:
        data = json.loads((path or cache_path()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("version") != VERSION:
        return {}
    entry = (data.get("machines") or {}).get(key or machine_key())
    return entry if isinstance(entry, dict) else {}


def save_calibration(
    record: Mapping[str, Any], protocol: str, path: Path | None = None, key: str | None = None
) -> Path:
    """Store ``record`` as this machine's calibration of ``protocol``, keeping every other entry; return the path."""
    path = path or cache_path()
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and loaded.get("schema") == SCHEMA and loaded.get("version") == VERSION:
            data = loaded
    data.update(schema=SCHEMA, version=VERSION)
    machines = data.setdefault("machines", {})
    machines.setdefault(key or machine_key(), {})[protocol] = dict(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # replaced atomically: a run reading it never sees half a file
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def run_protocols(result: Mapping[str, Any]) -> list[str]:
    """The protocols a result's scenarios sent with, each once, in order."""
    found: list[str] = []
    for spec in (result.get("scenario") or {}).get("scenarios", {}).values():
        for cls in spec.get("classes", []):
            if (protocol := cls.get("protocol")) and protocol not in found:
                found.append(protocol)
    return found


def applicable_ceiling(
    protocols: Sequence[str], calibrations: Mapping[str, Mapping[str, Any]]
) -> tuple[str, float] | None:
    """The lowest calibrated ceiling among ``protocols`` (a mix is only as accurate as its weakest part)."""
    known = [(p, float(calibrations[p]["ceiling_rate"])) for p in protocols
             if p in calibrations and calibrations[p].get("ceiling_rate")]  # fmt: skip
    return min(known, key=lambda pc: pc[1]) if known else None


def range_note(
    series: Sequence[Mapping[str, Any]], protocols: Sequence[str], calibrations: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any] | None:
    """How a run stood against this machine's calibration, for the result's ``calibration``; None: none applies.

    Args:
        series: the run's per-second series (one process's: ``started`` per second).
        protocols: the protocols it sent with.
        calibrations: this machine's calibrations by protocol.
    """
    ceiling = applicable_ceiling(protocols, calibrations)
    if ceiling is None:
        return None
    protocol, rate = ceiling
    over = [s for s in series if float(s.get("started", 0)) > rate]
    return {
        "protocol": protocol,
        "ceiling_rate": rate,
        "limited_by": calibrations[protocol].get("limited_by", "client"),
        "measured_at": calibrations[protocol].get("measured_at"),
        "seconds_over": len(over),
        "peak_rate": max((float(s.get("started", 0)) for s in series), default=0.0),
        "within": len(over) < OVER_SECONDS,
    }


def range_warnings(note: Mapping[str, Any] | None) -> list[str]:
    """The plain warning a run beyond its calibrated range gets; nothing within it or without a calibration."""
    if note is None or note["within"]:
        return []
    rate = f"{note['ceiling_rate']:,.0f} req/s"
    sent = (
        f"calibration: this process sent more than {rate} in {note['seconds_over']} s of the run "
        f"(peak {note['peak_rate']:,.0f}/s; {note['protocol']}, infer-bench calibrate of {note['measured_at']})"
    )
    if note["limited_by"] == "client":
        return [f"{sent}: measurements above {rate} per process on this machine are not trustworthy: use --processes"]
    # The calibration stopped before the client did (its server gave out, the machine was busy, or the
    # search ended): above its ceiling nobody knows how true the figures are.
    where = _STOPPED_BY.get(str(note["limited_by"]), "where the calibration stopped")
    return [
        f"{sent}: beyond the range calibrated on this machine (up to {rate} per process, {where}), accuracy is "
        "unknown: use --processes to stay within it"
    ]


_STOPPED_BY = {
    "target": "where the calibration's server gave out first",
    "machine": "where other work on the machine made the client late",
    "none": "the highest rate the calibration tried",
}
