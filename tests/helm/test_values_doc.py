"""values.yaml documents every value, the README's values table is generated from it, and the
schema describes exactly the keys values.yaml has."""

from __future__ import annotations

import json
from typing import Any

from tests.helm.values_doc import (
    README,
    SCHEMA,
    documented_keys,
    readme_with_table,
    values_table,
)


def test_every_value_has_a_description_comment() -> None:
    missing = [k.path for k in documented_keys() if not k.description]
    assert missing == [], f"add a '# -- description' comment above: {missing}"


def test_readme_values_table_is_generated_from_values_yaml() -> None:
    readme = README.read_text()
    assert readme == readme_with_table(readme, values_table()), (
        "the values table in helm/vllm-fleet/README.md is stale: run "
        "python -m tests.helm.values_doc --write"
    )


def _schema_paths(node: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        paths |= _schema_paths(sub, path + ".")
    return paths


def test_schema_and_values_yaml_have_the_same_keys() -> None:
    schema = json.loads(SCHEMA.read_text())
    in_values = {k.path for k in documented_keys()}
    in_schema = _schema_paths(schema) - {"global"}
    # Keys inside free-form maps (resources.requests, ...) are values, not schema properties.
    assert in_schema - in_values == set(), "schema keys missing from values.yaml"
    assert in_values - in_schema == set(), "values.yaml keys missing in the schema"


def test_a_missing_comment_is_noticed() -> None:
    text = "# -- documented\na: 1\nb: 2\n"
    schema: dict[str, Any] = {"properties": {"a": {}, "b": {}}}
    keys = {k.path: k.description for k in documented_keys(text, schema)}
    assert keys == {"a": "documented", "b": None}
