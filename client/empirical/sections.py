"""The registry of the empirical audit's sections, and the audit that runs them all.

A section is a function ``(run_dir) -> dict | None`` (None: it does not apply to the run).
The ``primary`` section's keys are the ``empirical`` object's own (``epsilon_lower_bound``,
``epsilon_accounted`` ...); every other section's dict sits under its name
(``"exposure"``, ``"user_level"``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrnn.shared.data.canaries import draw_path
from fedrnn.shared.errors import FedrnnError

Section = Callable[[Path], "dict[str, Any] | None"]
SECTIONS: dict[str, Section] = {}
PRIMARY = "one_run"


def register_section(name: str) -> Callable[[Section], Section]:
    """Decorator: ``@register_section("exposure")`` adds a section under ``name``."""

    def add(fn: Section) -> Section:
        SECTIONS[name] = fn
        return fn

    return add


def empirical(run_dir: str | Path) -> dict[str, Any]:
    """Every section that applies to ``run_dir``; a FedrnnError when none does."""
    run_dir = Path(run_dir)
    # the sections register themselves on import
    from fedrnn.client.empirical import exposure, one_run, user_level  # noqa: F401

    if not run_dir.is_dir():
        raise FedrnnError(f"{run_dir}: --empirical needs a run directory (from fedrnn "
                          "simulate --canaries M)")
    result: dict[str, Any] = {}
    for name, section in SECTIONS.items():
        found = section(run_dir)
        if found is None:
            continue
        if name == PRIMARY:
            result.update(found)
        else:
            result[name] = found
    if not result:
        raise FedrnnError(f"{run_dir}: nothing to audit empirically: no canaries "
                          f"({draw_path(run_dir)} is missing) and no canary clients; plant "
                          "them with fedrnn simulate --canaries M (record level) or "
                          "--canary-clients C (user level)")
    return result
