"""A JUnit XML report: one test case per threshold, so CI systems show failed thresholds as failed tests.

A run without thresholds still gets one test case, for its status: an interrupted or aborted run fails.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from infer_bench.report.figures import run_name
from infer_bench.thresholds import format_value, stored_results


def render_junit(results: list[dict[str, Any]]) -> str:
    suites = ET.Element("testsuites", name="infer-bench")
    total = failures = 0
    for index, result in enumerate(results):
        name = run_name(result, index)
        suite = ET.SubElement(suites, "testsuite", name=name, timestamp=str(result.get("started_at", "")))
        cases = 0
        failed = 0
        status_case = ET.SubElement(suite, "testcase", classname=f"{name}.run", name="run completed")
        status_case.set("time", f"{result.get('duration_s', 0):.3f}")
        cases += 1
        if result["status"] != "complete":
            ET.SubElement(status_case, "failure", message=f"status {result['status']}: {result.get('stop_reason')}")
            failed += 1
        for threshold in stored_results(result) or ():
            case = ET.SubElement(suite, "testcase", classname=f"{name}.thresholds", name=threshold.label)
            case.set("time", "0")
            cases += 1
            value = format_value(threshold.value, threshold.unit)
            if not threshold.ok:
                failed += 1
                failure = ET.SubElement(case, "failure", message=f"{threshold.label}: got {value}")
                failure.text = f"{threshold.metric} was {value}; the condition is {threshold.expression}"
            else:
                ET.SubElement(case, "system-out").text = value
        suite.set("tests", str(cases))
        suite.set("failures", str(failed))
        suite.set("errors", "0")
        total += cases
        failures += failed
    suites.set("tests", str(total))
    suites.set("failures", str(failures))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
