"""Run-directory policy (vlt.runs): a new run never resumes a stale one; requeues and explicit resumes do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlt import runs

SLURM_FIRST = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"}
SLURM_REQUEUED = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}


def _touch(path: Path, mtime: int) -> Path:
    """A small but real checkpoint file with the given mtime (resumes only pick files that load)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": mtime}, path)
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
    return path


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    """A run directory with a ModelCheckpoint file and a newer hpc checkpoint (the preempted state)."""
    run = tmp_path / "runs" / "exp"
    _touch(run / "checkpoints" / "last.ckpt", 1000)
    _touch(run / "hpc_ckpt_1.ckpt", 2000)
    (run / "config.yaml").write_text("name: exp\n")
    return run


def test_fresh_or_empty_dir_starts_fresh(tmp_path: Path) -> None:
    assert runs.resume_path(tmp_path / "missing", ckpt_path=None, env={}) is None
    run = tmp_path / "config-only"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")  # a run that failed at setup left nothing to mix
    assert runs.resume_path(run, ckpt_path=None, env={}) is None


@pytest.mark.parametrize(
    "env", [{}, SLURM_FIRST, {"SLURM_RESTART_COUNT": "3"}], ids=["local", "slurm", "no-job"]
)
def test_new_run_on_populated_dir_is_refused(populated: Path, env: dict) -> None:
    with pytest.raises(runs.StaleRunError) as err:
        runs.resume_path(populated, ckpt_path=None, env=env)
    message = str(err.value)
    assert str(populated) in message
    assert "--name=" in message and "--ckpt_path=last" in message and "delete" in message


def test_explicit_resume_is_allowed(populated: Path) -> None:
    # "last" means the newest state of the run, hpc checkpoints included (Lightning's "last" skips them).
    assert runs.resume_path(populated, ckpt_path="last", env={}) == str(populated / "hpc_ckpt_1.ckpt")
    other = str(populated / "checkpoints" / "last.ckpt")
    assert runs.resume_path(populated, ckpt_path=other, env={}) == other


def test_requeue_resumes_from_newest_checkpoint(populated: Path) -> None:
    assert runs.resume_path(populated, ckpt_path=None, env=SLURM_REQUEUED) == str(
        populated / "hpc_ckpt_1.ckpt"
    )
    _touch(populated / "hpc_ckpt_2.ckpt", 3000)
    # The job's original --ckpt_path is older than anything it wrote since: the newest wins.
    old = str(populated / "checkpoints" / "last.ckpt")
    assert runs.resume_path(populated, ckpt_path=old, env=SLURM_REQUEUED) == str(
        populated / "hpc_ckpt_2.ckpt"
    )
    _touch(populated / "checkpoints" / "step4000.ckpt", 4000)
    expected = str(populated / "checkpoints" / "step4000.ckpt")
    assert runs.resume_path(populated, ckpt_path=None, env=SLURM_REQUEUED) == expected


def test_requeue_before_any_checkpoint_starts_like_the_original_job(tmp_path: Path) -> None:
    assert runs.resume_path(tmp_path / "r", ckpt_path=None, env=SLURM_REQUEUED) is None
    assert runs.resume_path(tmp_path / "r", ckpt_path="init.ckpt", env=SLURM_REQUEUED) == "init.ckpt"


@pytest.mark.parametrize(
    ("env", "count"),
    [
        ({}, 0),
        ({"SLURM_RESTART_COUNT": "2"}, 0),
        (SLURM_FIRST, 0),
        (SLURM_REQUEUED, 1),
        ({"SLURM_JOB_ID": "1"}, 0),
    ],
)
def test_restart_count_needs_a_slurm_job(env: dict, count: int) -> None:
    assert runs.slurm_restart_count(env) == count


def test_check_command(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert runs.main(["check", str(tmp_path / "new")]) == 0
    assert runs.main(["check", str(populated), "--ckpt_path", "last"]) == 0
    assert runs.main(["check", str(populated)]) == 1
    assert "already holds outputs" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_helper_composes_the_job(tmp_path: Path) -> None:
    """scripts/slurm/submit.sh against a stand-in sbatch: job shape, trainer overrides, stale-run refusal."""
    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/args"\necho "123;cluster"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake.parent}:{env['PATH']}", NODES="2", GPUS="4", CPUS="6", TIME="1:00:00")
    env.update(PARTITION="gpu", ACCOUNT="proj", VLT=str(Path(sys.executable).parent / "vlt"))
    cmd = [str(root / "scripts/slurm/submit.sh"), "fit", "-c", str(root / "conf/tokenizer/tiny.yaml")]
    cmd += [f"--runs_dir={tmp_path}/runs", "--name=exp", "--trainer.max_steps=7"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"submitted job 123\nrun directory {tmp_path}/runs/exp\n" in done.stdout
    args = (fake.parent / "args").read_text().split()
    for option in ["--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--cpus-per-task=6", "--time=1:00:00"]:
        assert option in args
    assert "--partition=gpu" in args and "--account=proj" in args
    assert f"--output={tmp_path}/runs/exp/slurm-%j.out" in args
    # Stage config, then the SLURM trainer partial, then the user's overrides, then the job's shape.
    cli = args[args.index(str(root / "scripts/slurm/vlt.sbatch")) + 1 :]
    assert cli[:5] == [
        "fit",
        "-c",
        str(root / "conf/tokenizer/tiny.yaml"),
        "-c",
        str(root / "conf/trainer/slurm.yaml"),
    ]
    assert cli[-3:] == ["--trainer.max_steps=7", "--trainer.num_nodes=2", "--trainer.devices=4"]

    _touch(tmp_path / "runs" / "exp" / "checkpoints" / "last.ckpt", 1000)
    (fake.parent / "args").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert again.returncode != 0 and "already holds outputs" in again.stderr
    assert not (fake.parent / "args").exists()


@pytest.mark.parametrize("max_steps", [5, 6])
def test_last_checkpoint_is_the_final_step(tmp_path: Path, max_steps: int):
    """last.ckpt holds the fit's final step also when max_steps is not a multiple of every_n_train_steps
    (Lightning's own ModelCheckpoint leaves it at step 4 of 5), with the training weights to resume from
    beside the EMA average (as the step files hold them), not the average copied over them at fit end."""
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from lightning.pytorch.demos.boring_classes import BoringModel

    from vlt.callbacks.checkpoint import ModelCheckpoint

    every = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[EMAWeightAveraging(decay=0.5), every], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
        devices=1,
    )  # fmt: skip
    trainer.fit(BoringModel())
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == max_steps
    average, current = last["state_dict"]["layer.weight"], last["current_model_state"]["layer.weight"]
    assert not torch.equal(average, current)
    assert sorted(p.name for p in tmp_path.glob("epoch=*")) == sorted(
        f"epoch=0-step={s}.ckpt" for s in range(2, max_steps + 1, 2)
    )
