"""Render the report templates (jinja2, autoescaped, strict about undefined names)."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import jinja2

__all__ = ["render"]


def _number(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ``digits`` significant digits, "n/a" for None and nan."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def _p_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return "< 0.001" if float(value) < 0.001 else f"{float(value):.3f}"


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fcflow.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["number"] = _number
    environment.filters["p_value"] = _p_value
    return environment


def render(template: str, **context: Any) -> str:
    """Render ``fcflow/reports/templates/<template>`` with ``context`` (HTML-escaped)."""
    return _environment().get_template(template).render(**context)
