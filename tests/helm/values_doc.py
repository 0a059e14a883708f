"""The chart's values table, generated from the `# --` comments in values.yaml (helm-docs style).

Every key in values.yaml carries a `# -- description` comment just above it (continued by more
`#` lines). The README table lists the leaves: keys whose value is a scalar, a list, or a map the
schema leaves free-form (resources, affinity, ...). The tests check that the table in the chart's
README is exactly what this module generates; after editing values.yaml run

    python -m tests.helm.values_doc --write
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from tests.helm.render import CHART_DIR

VALUES = CHART_DIR / "values.yaml"
SCHEMA = CHART_DIR / "values.schema.json"
README = CHART_DIR / "README.md"
BEGIN = "<!-- values-table:begin (python -m tests.helm.values_doc --write) -->"
END = "<!-- values-table:end -->"


@dataclass(frozen=True)
class Documented:
    """One key of values.yaml with its comment."""

    path: str
    value: Any
    description: str | None  # None: no `# --` comment above the key
    is_section: bool  # a map whose keys the schema lists (documented one by one)


def _description(lines: list[str], key_line: int) -> str | None:
    """The `# --` comment block right above line ``key_line`` (0-based), or None."""
    block: list[str] = []
    index = key_line - 1
    while index >= 0 and lines[index].strip().startswith("#"):
        text = lines[index].strip()
        if text.startswith("# --"):
            block.append(text[len("# --") :].strip())
            return " ".join(reversed(block)).strip()
        block.append(text.lstrip("#").strip())
        index -= 1
    return None


def _schema_at(schema: dict[str, Any], path: list[str]) -> dict[str, Any]:
    node = schema
    for part in path:
        node = node.get("properties", {}).get(part, {})
    return node


def documented_keys(
    values_text: str | None = None, schema: dict[str, Any] | None = None
) -> list[Documented]:
    """Every key of values.yaml in file order, with its description."""
    text = VALUES.read_text() if values_text is None else values_text
    schema = json.loads(SCHEMA.read_text()) if schema is None else schema
    lines = text.splitlines()
    found: list[Documented] = []

    def walk(node: yaml.Node, path: list[str]) -> None:
        assert isinstance(node, yaml.MappingNode)
        for key_node, value_node in node.value:
            key_path = [*path, key_node.value]
            sub_schema = _schema_at(schema, key_path)
            section = isinstance(value_node, yaml.MappingNode) and "properties" in sub_schema
            found.append(
                Documented(
                    path=".".join(key_path),
                    value=yaml.safe_load(yaml.serialize(value_node)),
                    description=_description(lines, key_node.start_mark.line),
                    is_section=section,
                )
            )
            if section:
                walk(value_node, key_path)

    root = yaml.compose(text)
    assert root is not None
    walk(root, [])
    return found


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def values_table(keys: list[Documented] | None = None) -> str:
    rows = [
        "| Key | Type | Default | Description |",
        "|-----|------|---------|-------------|",
    ]
    for key in documented_keys() if keys is None else keys:
        if key.is_section:
            continue
        default = json.dumps(key.value, separators=(",", ":"))
        rows.append(
            f"| `{key.path}` | {_type_name(key.value)} | `{_cell(default)}` "
            f"| {_cell(key.description or '')} |"
        )
    return "\n".join(rows) + "\n"


def readme_with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the table markers replaced by ``table``."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args(argv)
    table = values_table()
    if args.write:
        README.write_text(readme_with_table(README.read_text(), table))
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
