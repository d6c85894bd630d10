"""Logged names of a curve's values: `budget/<column>@k<K>` for fixed K, `@<mode>_b<budget>` for
adaptive rows and `@<mode>_floor<dB>` for quality-target rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlt.metrics.budget.scorer import scalar_name

# Row columns that are coordinates of a point, not values measured at it.
BASE_COLUMNS = ("step", "epoch", "k", "tokens", "flops", "mode", "budget", "lambda", "k_rms", "floor")


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """Scalars of one row: tokens, TFLOPs, every value (intervals included); the generation TFLOPs of
    each guidance scale on fixed-K rows."""
    fixed = row.get("mode", "fixed") == "fixed"
    if fixed:
        tag = f"k{row['k']}"
    elif row.get("floor") not in (None, ""):  # a quality-target row: <mode>_floor<dB>
        tag = f"{row['mode']}_floor{float(row['floor']):g}"
    else:
        tag = f"{row['mode']}_b{row['budget']:g}"
    out = {f"budget/tokens@{tag}": row["tokens"], f"budget/tflops@{tag}": row["flops"] / 1e12}
    for column, value in row.items():
        if column in BASE_COLUMNS or column.startswith("flops"):
            continue
        out[scalar_name(column, tag)] = value
        if fixed and f"flops_{column}" in row:
            _, _, scale = column.partition("_w")
            out[f"budget/gen_tflops@{tag}" + (f"_w{scale}" if scale else "")] = row[f"flops_{column}"] / 1e12
    return out


def budget_scalars(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Scalars of every row of one evaluation (the callback logs them at the evaluation's step)."""
    out: dict[str, float] = {}
    for row in rows:
        out.update(row_scalars(row))
    return out
