"""Token-budget curves on disk (CSV + JSON beside a run), their figures, and `vlt curves`.

A curve is a list of rows, one per K: step, epoch, k, tokens (per image), flops (per image) and one
column per metric (psnr, rfid_proxy, gfid_proxy_w1.5, gfd_vltnet, ...). A metric column `c` may carry
the half-width of its interval in `c_ci` (drawn as error bars, printed as `mean ± half-width`) and a
generation column its own FLOPs in `flops_c` (sampling costs differ between guidance scales).
Rows carry a `mode`: "fixed" (one K for every image), or "adaptive" / "adaptive-k2" (per-image K at a
mean budget `k`, see `vlt.metrics.budget.adaptive`); each mode is drawn as its own line.

    vlt curves --runs '[runs/a, runs/b]' --out curves.png [--metric rfid_proxy]
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure

from vlt.metrics.budget.scalars import BASE_COLUMNS

CURVES_DIR = "curves"
CSV_NAME = "budget.csv"
JSON_NAME = "budget_latest.json"
Row = Mapping[str, Any]


def metric_columns(rows: Sequence[Row]) -> list[str]:
    """Metric columns in first-seen order (not the base, FLOPs, interval or subset-std columns)."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in BASE_COLUMNS and not key.startswith("flops") and not key.endswith("_ci"):
                seen[key] = None
    return [key for key in seen if "subset_std" not in key]


def interval(row: Row, column: str) -> float | None:
    """The half-width of `column`'s interval in `row`, or None."""
    value = row.get(f"{column}_ci")
    return None if value in (None, "") or value != value else float(value)


def cell(row: Row, column: str, spec: str = ".4g") -> str:
    """`mean ± half-width` (or the mean alone) of `column` in `row`; empty when absent."""
    if row.get(column) in (None, ""):
        return ""
    half = interval(row, column)
    mean = format(float(row[column]), spec)
    return mean if half is None else f"{mean} ± {format(half, '.2g')}"


def by_mode(rows: Sequence[Row], label: str) -> dict[str, list[Row]]:
    """Split a curve into one line per mode: `label` for fixed K, `label (adaptive)` etc. otherwise."""
    out: dict[str, list[Row]] = {}
    for row in rows:
        mode = row.get("mode") or "fixed"
        out.setdefault(label if mode == "fixed" else f"{label} ({mode})", []).append(row)
    return out


def x_value(row: Row, column: str, x: Literal["tokens", "flops"]) -> float:
    """The x coordinate of `column` in `row`: tokens, or the FLOPs that produced that metric."""
    if x == "tokens":
        return float(row["tokens"])
    if f"flops_{column}" in row:
        return float(row[f"flops_{column}"])
    _, _, scale = column.removesuffix("_ci").partition("_w")  # another score at the same guidance scale
    same = [v for key, v in row.items() if key.startswith("flops_") and scale and key.endswith(f"_w{scale}")]
    return float(same[0] if same else row["flops"])


def write_curve(directory: str | Path, rows: Sequence[Row], meta: Mapping[str, Any]) -> Path:
    """Append `rows` to curves/budget.csv and replace curves/budget_latest.json; returns the folder.

    A CSV whose header lacks a new column is rewritten with the union of columns, so one file
    holds every evaluation of the run even when the metrics change on resume.
    """
    folder = Path(directory) / CURVES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / CSV_NAME
    old_rows: list[dict[str, Any]] = []
    fields = list(BASE_COLUMNS)
    if csv_path.is_file():
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or fields)
            old_rows = list(reader)
    new_fields = [key for row in rows for key in row if key not in fields]
    fields += list(dict.fromkeys(new_fields))
    mode = "a" if csv_path.is_file() and not new_fields else "w"
    with csv_path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if mode == "w":
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows(rows)
    latest = {**meta, "rows": [dict(row) for row in rows]}
    (folder / JSON_NAME).write_text(json.dumps(latest, indent=1))
    return folder


def find_latest(run_dir: str | Path) -> Path:
    """The newest curves/budget_latest.json under `run_dir`, or a ValueError that says how to make one."""
    run = Path(run_dir)
    direct = run / CURVES_DIR / JSON_NAME
    found = [direct] if direct.is_file() else sorted(run.rglob(f"{CURVES_DIR}/{JSON_NAME}"))
    if not found:
        raise ValueError(
            f"no token-budget curve in {run} (looked for {CURVES_DIR}/{JSON_NAME}): curves are written by "
            "vlt.callbacks.TokenBudgetCallback during `vlt fit` or `vlt validate`; add it to the config's "
            "trainer.callbacks and point `vlt curves` at the run directory (runs/<name>)."
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def draw_curves(ax, curves: Mapping[str, Sequence[Row]], column: str, x: Literal["tokens", "flops"]) -> None:
    """Draw `column` of every curve (one line per label) against tokens or FLOPs into `ax`."""
    if x not in ("tokens", "flops"):
        raise ValueError(f"unknown x axis {x!r}; expected one of ('tokens', 'flops')")
    for label, rows in curves.items():
        points = sorted(
            (x_value(row, column, x), float(row[column]), interval(row, column) or 0.0)
            for row in rows
            if row.get(column) not in (None, "")
        )
        if points:
            xs, ys, halves = zip(*points)
            bars = halves if any(halves) else None
            ax.errorbar(xs, ys, yerr=bars, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2 if x == "tokens" else 10)
    ax.set_xlabel("tokens per image" if x == "tokens" else "FLOPs per image")
    ax.set_ylabel(column)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_curves(
    curves: Mapping[str, Sequence[Row]], columns: Sequence[str], *, x: Literal["tokens", "flops"]
) -> Figure:
    """One panel per metric column, one line per curve label, against tokens or FLOPs per image."""
    figure = Figure(figsize=(4.2 * max(len(columns), 1), 3.4), layout="constrained")
    axes = figure.subplots(1, max(len(columns), 1), squeeze=False)[0]
    for ax, column in zip(axes, columns):
        draw_curves(ax, curves, column, x)
    return figure


def markdown_table(curves: Mapping[str, Sequence[Row]], columns: Sequence[str]) -> str:
    lines = ["| run | k or budget | mean K | GFLOPs | " + " | ".join(columns) + " |"]
    lines.append("|---|---:|---:|---:|" + "---:|" * len(columns))
    for label, rows in curves.items():
        for row in sorted(rows, key=lambda r: float(r["k"])):
            values = [cell(row, c) for c in columns]
            lines.append(
                f"| {label} | {float(row['k']):g} | {float(row['tokens']):.4g} | "
                f"{float(row['flops']) / 1e9:.4g} | " + " | ".join(values) + " |"
            )
    return "\n".join(lines)


def curves(runs: list[str], out: str = "curves.png", metric: str | None = None) -> str:
    """Overlay the latest token-budget curve of each run: metric vs tokens and vs FLOPs.

    Args:
        runs: run directories (runs/<name>) that a TokenBudgetCallback wrote curves into.
        out: the PNG to write; a markdown table goes beside it (same name, .md).
        metric: the column to plot (e.g. gfd_vltnet, gfid_proxy, psnr); default: the first
            `*fd_vltnet` column, else the first FID-like one, else the first metric.

    Returns:
        The markdown table (also printed).
    """
    if not runs:
        raise ValueError("give at least one run directory")
    loaded = {}
    for run in runs:
        label = Path(run).resolve().name
        rows = json.loads(find_latest(run).read_text())["rows"]
        loaded.update(by_mode(rows, label if not any(key.startswith(label) for key in loaded) else run))
    available = metric_columns([row for rows in loaded.values() for row in rows])
    if metric is None:
        fid_like = [c for c in available if "fd_vltnet" in c] or [c for c in available if "fid" in c]
        metric = (fid_like or available or [None])[0]
    if metric is None or metric not in available:
        raise ValueError(f"metric {metric!r} is not in the curves; available: {available}")
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, x in zip(figure.subplots(1, 2), ("tokens", "flops")):
        draw_curves(ax, loaded, metric, x)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=110)
    table = markdown_table(loaded, [metric])
    out_path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    return table
