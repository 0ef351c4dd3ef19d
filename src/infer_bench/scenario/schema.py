"""The JSON Schema of the scenario file format, for editors (YAML language servers) to complete and check.

It is pydantic's schema of the file models, with what the models cannot say added: a scenario may hold
one class's keys itself, and k6's camelCase option names are accepted beside ours.
"""

from __future__ import annotations

from typing import Any

from infer_bench.scenario.base import ALIASES
from infer_bench.scenario.fileformat import INLINE_KEYS, SCENARIO_ENTRY_TYPES, ClassDefaults, ScenarioFile
from infer_bench.scenario.layout import EXTENSION_PREFIX
from infer_bench.scenario.templates import REQUEST_TYPES

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def scenario_json_schema() -> dict[str, Any]:
    """The JSON Schema of a scenario file (snake_case keys, k6 camelCase spellings allowed)."""
    schema = ScenarioFile.model_json_schema(mode="validation")
    defs: dict[str, Any] = schema["$defs"]
    any_request = {"anyOf": [{"$ref": f"#/$defs/{template.__name__}"} for template in REQUEST_TYPES.values()]}
    for template in REQUEST_TYPES.values():  # every template is referenced by a class entry, but be sure
        defs.setdefault(template.__name__, template.model_json_schema(ref_template="#/$defs/{model}"))
    class_defaults = defs[ClassDefaults.__name__]["properties"]
    class_defaults["request"] = {"anyOf": [any_request, {"type": "null"}], "description": "a request template"}
    inline = {key: class_defaults[key] for key in INLINE_KEYS}
    for entry_type in SCENARIO_ENTRY_TYPES:
        entry = defs[entry_type.__name__]
        properties: dict[str, Any] = entry["properties"]
        properties.update(inline)
        for spelled, ours in ALIASES.items():
            if ours in properties:
                properties[spelled] = {**properties[ours], "description": f"k6's spelling of {ours}"}
        # The layout fills classes from the inline keys (or with one default class).
        entry["required"] = [key for key in entry.get("required", []) if key != "classes"]
    schema["patternProperties"] = {f"^{EXTENSION_PREFIX}": {"description": "ignored; a place for YAML anchors"}}
    return {"$schema": SCHEMA_DIALECT, "title": "infer-bench scenario", **schema}
