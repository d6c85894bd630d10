"""The notebooks run top to bottom (the stage ones on the tiny session checkpoints) and are stored without
outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NOTEBOOKS = ["01_embedded_data.ipynb", "02_tokenizer_merging.ipynb", "03_sampling.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code"
    )


def execute(name: str, tmp_path, env: dict) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "nbconvert",
        "--to",
        "notebook",
        "--execute",
        "--output-dir",
        str(tmp_path),
        "--ExecutePreprocessor.timeout=300",
        str(ROOT / "notebooks" / name),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env}, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    executed = json.loads((tmp_path / name).read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    return outputs


@pytest.mark.slow
def test_embedded_data_notebook(tmp_path):
    """It builds the embedded sets if they are missing."""
    outputs = execute("01_embedded_data.ipynb", tmp_path, {})
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3


@pytest.mark.slow
def test_tokenizer_notebook(tmp_path, tiny_tokenizer, tiny_shards):
    data_root = tmp_path / "data"
    (data_root / "synthetic").mkdir(parents=True)
    (data_root / "synthetic" / "shards").symlink_to(tiny_shards["root"])
    outputs = execute(
        "02_tokenizer_merging.ipynb",
        tmp_path,
        {"VLT_TOKENIZER": str(tiny_tokenizer), "VLT_DATA": str(data_root)},
    )
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2


@pytest.mark.slow
def test_sampling_notebook(tmp_path, tiny_tokenizer, tiny_dit):
    env = {"VLT_DIT": str(tiny_dit), "VLT_TOKENIZER": str(tiny_tokenizer), "VLT_STEPS": "2"}
    outputs = execute("03_sampling.ipynb", tmp_path, env)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
