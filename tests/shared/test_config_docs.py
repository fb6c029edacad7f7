"""docs/configuration.md is generated from RunConfig and must match it."""

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from fedrnn.shared.config import RunConfig, key_of
from fedrnn.shared.config_docs import grouped_fields, markdown, toml_value

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_page_is_what_the_generator_writes():
    assert PAGE.read_text(encoding="utf-8") == markdown(), (
        "docs/configuration.md is stale: run "
        "`python -m fedrnn.shared.config_docs > docs/configuration.md`")


def test_every_field_has_one_row_with_its_flag_key_default_and_help():
    page = markdown()
    rows = [line for line in page.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(fields(RunConfig))
    defaults = RunConfig()
    for f in fields(RunConfig):
        key = key_of(f.name)
        (row,) = [r for r in rows if f"| `{key}` |" in r]
        assert row.startswith(f"| `--{key}")
        assert f"| `{toml_value(getattr(defaults, f.name))}` |" in row
        assert f.metadata["help"].replace("|", "\\|") in row
    assert "| `--dp / --no-dp` | `dp` | `true` |" in page


def test_fields_keep_the_dataclass_groups_and_order():
    groups = grouped_fields()
    names = [g for g, _ in groups]
    assert names[:2] == ["data", "model"] and "privacy" in names
    flat = [f.name for _, group in groups for f in group]
    assert flat == [f.name for f in fields(RunConfig)]
    privacy = dict(groups)["privacy"]
    assert "epsilon" in [f.name for f in privacy]


def test_the_module_prints_the_page():
    out = subprocess.run([sys.executable, "-m", "fedrnn.shared.config_docs"],
                         capture_output=True, text=True, check=True).stdout
    assert out == markdown()
