"""The README's key table ("A tour of the config keys") agrees with the config schema: every
schema key is in the table, every key in the table is in the schema, and every default in the
table is the schema's default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from daskadmm.config import ALGORITHM_OVERRIDES, Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## A tour of the config keys"
# `group=` rows: the schema key that names the group's option (storage= selects a file only).
SELECTORS = {"algorithm": "algorithm.name", "model": "model.kind", "data": "data.name",
             "cluster": "cluster.kind", "experiment": "experiment", "storage": None}


def schema_defaults() -> dict[str, Any]:
    """Every key of the schema as ``section.key`` (``experiment`` at the top) -> its default."""
    out: dict[str, Any] = {}
    for name, value in Config().to_dict().items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_rows() -> list[tuple[list[str], str, list[str]]]:
    """The key table's rows: (keys, meaning, defaults), a ``group=`` selector kept as written."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README has no section {SECTION!r}"
    lines = text[text.index(SECTION):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| key |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        key_cell, meaning, default_cell = _cells(line)
        keys = re.findall(r"`([^`]+)`", key_cell)
        assert keys and ", ".join(f"`{k}`" for k in keys) == key_cell, line
        defaults = [d.strip() for d in default_cell.split(", ")]
        if len(defaults) == 1:
            defaults = defaults * len(keys)
        assert len(defaults) == len(keys), f"one default per key: {line}"
        rows.append((keys, meaning, defaults))
    return rows


def parse_default(text: str) -> Any:
    """A default as the table writes it: ``null``, ``true``/``false``, a number (``2``,
    ``2.0``, ``1e-3``) or a word, with or without backticks."""
    text = text.strip().strip("`")
    if text == "null":
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def same(table: Any, schema: Any) -> bool:
    if schema is None or isinstance(schema, bool):
        return table is schema
    if isinstance(schema, int | float):
        return (isinstance(table, int | float) and not isinstance(table, bool)
                and float(table) == float(schema))
    return table == schema


def _resolve(key: str) -> str | None:
    if key.endswith("="):
        group = key[:-1]
        assert group in SELECTORS, f"unknown group selector {key!r}"
        return SELECTORS[group]
    return key


def _default_option(group: str) -> str | None:
    raw = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    for entry in raw["defaults"]:
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


def test_every_schema_key_is_in_the_table():
    documented = {_resolve(k) for keys, _, _ in table_rows() for k in keys}
    missing = sorted(set(schema_defaults()) - documented)
    assert not missing, f"README key table lacks {missing}"


def test_every_table_key_is_in_the_schema():
    schema = schema_defaults()
    seen: set[str] = set()
    for keys, _, _ in table_rows():
        for key in keys:
            resolved = _resolve(key)
            if resolved is None:
                continue
            assert resolved in schema, f"README key table names {key!r}, not in the schema"
            assert resolved not in seen, f"{key!r} is twice in the README key table"
            seen.add(resolved)


def test_table_defaults_are_the_schemas():
    schema = schema_defaults()
    wrong = []
    for keys, _, defaults in table_rows():
        for key, text in zip(keys, defaults, strict=True):
            resolved = _resolve(key)
            expected = _default_option(key[:-1]) if resolved is None else schema[resolved]
            if not same(parse_default(text), expected):
                wrong.append(f"{key}: README {text}, schema {expected!r}")
    assert not wrong, "README key table defaults differ: " + "; ".join(wrong)


@pytest.mark.parametrize(("name", "key", "value"),
                         [(n, k, v) for n, o in ALGORITHM_OVERRIDES.items() for k, v in o.items()])
def test_table_names_the_per_algorithm_defaults(name, key, value):
    meaning = {k: m for keys, m, _ in table_rows() for k in keys}[f"algorithm.{key}"]
    assert f"`{name}`" in meaning and str(value) in meaning, (
        f"README: algorithm.{key} should say it is {value} for {name}")


@pytest.mark.parametrize(("text", "value"), [("2.0", 2), ("`2`", 2.0), ("1e-3", 0.001),
                                             ("null", None), ("false", False), ("`tanh`", "tanh")])
def test_parse_default(text, value):
    assert same(parse_default(text), value)


def test_parse_default_keeps_types_apart():
    assert not same(parse_default("0"), False)
    assert not same(parse_default("false"), 0)
    assert not same(parse_default("null"), 0)


def test_the_layout_section_names_every_module():
    """README's Layout block names every module of the package (so it follows the tree)."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[layout.index("```"):layout.index("```", layout.index("```") + 3)]
    package = ROOT / "daskadmm"
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py" and path.parent != package:
            continue
        assert path.name in layout, f"README's Layout does not mention {path.relative_to(ROOT)}"
