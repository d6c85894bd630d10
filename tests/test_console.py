"""What a person sees: progress lines on a pipe, a clean start, the closing summary, readable panels,
list options typed as a person types them, and light tools that start without Lightning."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, TINY_TOKENIZER
from vlt import console
from vlt.cli import join_list_options
from vlt.cli import main as vlt
from vlt.panels import BACKGROUND, panel, pattern_panel


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VLT_"))}
    return env | extra


def test_fit_on_a_pipe_prints_progress_lines_and_a_summary_without_third_party_noise(tmp_path, tiny_shards):
    """stdout is a pipe here (not a terminal): status lines, no bar, no tips, the summary at the end."""
    args = ["fit", "-c", str(ROOT / "conf/tokenizer/tiny.yaml"), f"--runs_dir={tmp_path}", "--name=tok"]
    args += [f"--data.init_args.train={tiny_shards['train']}", f"--data.init_args.val={tiny_shards['val']}"]
    run = subprocess.run(
        [sys.executable, "-m", "vlt.cli", *args, *TINY_TOKENIZER],
        capture_output=True, text=True, cwd=ROOT, env=_clean_env(VLT_PROGRESS_EVERY="0"), timeout=600,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    steps = [line for line in run.stdout.splitlines() if line.startswith("fit tok: step ") and "it/s" in line]
    assert len(steps) >= 6, run.stdout
    assert "ETA" in steps[0] and "loss" in steps[0]
    assert "fit tok: step 3 validation: val/psnr K=4:" in run.stdout
    assert "== fit tok: done at step 6 ==" in run.stdout
    assert f"run directory: {tmp_path / 'tok'}" in run.stdout
    assert "next: make train-dit TOKENIZER=" in run.stdout
    for noise in ("💡", "LeafSpec", "srun", "| Name ", "\r"):
        assert noise not in out, noise
    third_party = [line for line in out.splitlines() if "site-packages" in line and "Warning: " in line]
    assert not third_party, third_party  # a new dependency warning is filtered by name or fixed
    # The panels beside the run: tiles of at least 128 px, one row per K plus the input row.
    recon = np.asarray(Image.open(tmp_path / "tok" / "panels" / "reconstructions.png"))
    assert recon.shape[0] >= 5 * 128 and recon.shape[1] >= 8 * 128
    assert (tmp_path / "tok" / "panels" / "reconstructions_step6.png").is_file()
    assert (tmp_path / "tok" / "panels" / "merge_pattern.png").is_file()


def test_quiet_silences_progress_and_summaries(monkeypatch, capsys):
    monkeypatch.setenv("VLT_QUIET", "1")
    assert list(console.progress(range(3), desc="x")) == [0, 1, 2]
    console.summary("done", where="here", numbers={"a": 1.0})
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("VLT_QUIET", "0")
    monkeypatch.setenv("VLT_PROGRESS_EVERY", "0")
    assert list(console.progress(range(3), desc="items")) == [0, 1, 2]
    console.summary("done", where="here", numbers={"a": 1.0}, next_steps=["make more"])
    out = capsys.readouterr().out
    assert "items 3/3 (100%)" in out and "== done ==" in out and "next: make more" in out


def test_status_line_reads_as_a_person_would_write_it():
    line = console.status_line("fit x: step", 100, 400, 50.0, "loss 0.5")
    assert line == "fit x: step 100/400 (25%) 2.00 it/s ETA 2m30s elapsed 50s loss 0.5"
    assert "ETA" not in console.status_line("fit x: step", 400, 400, 50.0)
    assert console.duration(3725) == "1h02m"


def _tool(
    k: list[int] | None = None, scales: list[float] | None = None, shards: str | list[str] = ""
) -> None:
    """A stand-in signature with the list shapes the tools use."""


def test_list_options_take_space_separated_values():
    args = ["--k", "8", "16", "--scales", "-1", "2.5", "--shards", "a-*.tar", "b.tar", "--out", "x"]
    assert join_list_options(_tool, args, "vlt t") == [
        "--k=[8, 16]", "--scales=[-1.0, 2.5]", '--shards=["a-*.tar", "b.tar"]', "--out", "x"
    ]  # fmt: skip
    for old in (["--k=[8,16]"], ["--k", "[8, 16]"]):  # the old forms still work
        assert join_list_options(_tool, old, "vlt t") == old
    with pytest.raises(SystemExit, match=r"--k takes int values, got 'x'; e\.g\. --k 8 16"):
        join_list_options(_tool, ["--k", "8", "x"], "vlt t")
    with pytest.raises(SystemExit, match="--k needs at least one value"):
        join_list_options(_tool, ["--k", "--out", "x"], "vlt t")


def test_sample_takes_k_as_typed(tiny_dit, tmp_path):
    vlt(["sample", "--dit", str(tiny_dit), "--k", "4", "8", "--count", "3", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("grid_k*.png")) == ["grid_k4.png", "grid_k8.png"]
    assert np.load(tmp_path / "samples_k4.npz")["arr_0"].shape == (3, 32, 32, 3)
    grid = Image.open(tmp_path / "grid_k8.png")
    assert grid.height >= 128 and grid.width >= 3 * 128


@pytest.mark.parametrize(
    "tool", [["data", "--help"], ["curves", "--help"], ["allocate", "--help"], ["convert", "--help"]]
)
def test_light_tools_start_without_lightning(tool):
    code = (
        "import sys\nfrom vlt.cli import main\n"
        f"try:\n    main({tool!r})\nexcept SystemExit:\n    pass\n"
        "print('LOADED', 'lightning' in sys.modules, 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    _, lightning, torch = run.stdout.strip().splitlines()[-1].split()
    assert lightning == "False"
    if tool[0] == "data":  # the shard builders need neither torch nor webdataset's torch import
        assert torch == "False"


def test_panel_upscales_without_blur_and_labels_rows_and_columns():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    bare = panel(rows)
    labelled = panel(rows, row_labels=["input", "K=4"], col_labels=["a", "b", "c"], title="t")
    assert bare.shape == (2 + 2 * 130, 2 + 3 * 130, 3)
    assert labelled.shape[0] > bare.shape[0] and labelled.shape[1] > bare.shape[1]
    # Nearest-neighbour: each source pixel becomes one constant 4x4 block.
    tile = bare[2 : 2 + 128, 2 : 2 + 128]
    assert np.array_equal(tile, rows[0][0].repeat(4, 0).repeat(4, 1))
    margin = labelled[:, :20]  # the row labels are drawn in the left margin
    assert (margin != np.array(BACKGROUND, np.uint8)).any()


def test_pattern_panel_shows_merges_and_dropped_slots():
    assign = {2: np.array([0, 0, 1, 1]), 3: np.array([0, 1, 2, -1]), 4: np.arange(4)}
    picture = pattern_panel(assign, cell=16)
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[1] >= 4 * 16
