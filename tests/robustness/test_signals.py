"""SIGTERM / SIGINT to a real training process: a checkpoint at a step boundary and a non-zero exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vlt.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("signal_fit.py")


def start(run_dir: Path, mode: str, wait_for: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(run_dir), mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**env, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith(wait_for):
            return proc
    raise AssertionError(f"the fit ended (rc {proc.wait()}) before printing {wait_for!r}")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_at_a_step_boundary_and_exits_non_zero(tmp_path, signum, code):
    proc = start(tmp_path, "steps", "step 3")
    proc.send_signal(signum)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, rest
    (ckpt,) = tmp_path.glob("hpc_ckpt_*.ckpt")
    state = load_checkpoint(ckpt)
    assert state["global_step"] >= 3 and f"step {state['global_step']}" in rest  # saved after that step


def test_signal_during_a_stalled_stream_still_stops(tmp_path):
    proc = start(tmp_path, "stall", "StopAtStepEnd armed")  # the handler is in place, then no batch comes
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1 and "without a checkpoint" in rest, rest  # after grace_s, no step boundary
