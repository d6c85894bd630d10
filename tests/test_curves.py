"""`vlt curves`: overlay the latest curves of two runs into one PNG and a markdown table."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from tests.test_token_budget import fit
from vlt.callbacks.curves import curves, metric_columns, plot_curves, write_curve
from vlt.cli import main


def test_curves_overlays_two_runs(tmp_path, capsys):
    for name in ("small", "large"):
        fit(tmp_path, CSVLogger(tmp_path, name=name, version=""), metrics=["psnr"], every_n_steps=None)
    out = tmp_path / "plots" / "budget.png"
    main(["curves", "--runs", f"[{tmp_path / 'small'}, {tmp_path / 'large'}]", "--out", str(out)])
    assert Image.open(out).size[0] > 100
    table = out.with_suffix(".md").read_text()
    assert "| small | 4 |" in table and "| large | 16 |" in table and "psnr" in table
    assert "| large | 16 |" in capsys.readouterr().out


def test_curves_picks_fid_and_uses_latest_evaluation(tmp_path):
    rows = lambda step, scale: [
        {
            "step": step,
            "epoch": 0,
            "k": k,
            "tokens": k,
            "flops": 1e9 * k,
            "psnr": 20 + k,
            "rfid_proxy": scale / k,
        }
        for k in (8, 32)
    ]
    write_curve(tmp_path / "run", rows(1, 100.0), {"step": 1})
    write_curve(tmp_path / "run", rows(5, 10.0), {"step": 5})
    table = curves([str(tmp_path / "run")], out=str(tmp_path / "c.png"))
    assert "rfid_proxy" in table and "| run | 8 | 8 | 8 | 1.25 |" in table
    assert (tmp_path / "run" / "curves" / "budget.csv").read_text().count("\n") == 5  # header + 2 x 2 rows
    with pytest.raises(ValueError, match=r"metric 'gfid' is not in the curves; available: \['psnr'"):
        curves([str(tmp_path / "run")], out=str(tmp_path / "c.png"), metric="gfid")


def test_curves_names_a_run_without_curves(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no token-budget curve in .*empty_run.*TokenBudgetCallback"):
        curves([str(empty)], out=str(tmp_path / "c.png"))


def test_adaptive_rows_are_their_own_lines(tmp_path):
    fixed = [
        {"step": 1, "epoch": 0, "k": k, "tokens": k, "flops": k, "psnr": 20 + k, "mode": "fixed"}
        for k in (4, 8)
    ]
    adaptive = [{**row, "mode": "adaptive", "tokens": row["k"] - 0.5, "psnr": 30 + row["k"]} for row in fixed]
    write_curve(tmp_path / "run", fixed + adaptive, {"step": 1})
    table = curves([str(tmp_path / "run")], out=str(tmp_path / "c.png"), metric="psnr")
    assert "| run | 4 | 4 | " in table and "| run (adaptive) | 4 | 3.5 | " in table
    assert "| run (adaptive) | 8 | 7.5 | 8e-09 | 38 |" in table


def test_intervals_become_error_bars_and_plus_minus_cells(tmp_path):
    rows = [
        {"step": 1, "epoch": 0, "k": k, "tokens": k, "flops": k, "gfd_vltnet": 2.0 / k, "gfd_vltnet_ci": 0.05}
        for k in (4, 8)
    ]
    rows[1]["gkid_subset_std_vltnet"] = 0.1
    write_curve(tmp_path / "run", rows, {"step": 1})
    assert metric_columns(rows) == ["gfd_vltnet"]  # intervals and subset std are not panels
    table = curves([str(tmp_path / "run")], out=str(tmp_path / "c.png"))  # default: the vltnet distance
    assert "| run | 4 | 4 | 4e-09 | 0.5 ± 0.05 |" in table
    figure = plot_curves({"run": rows}, ["gfd_vltnet"], x="tokens")
    bars = [c for c in figure.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]
    assert bars and bars[0].has_yerr
