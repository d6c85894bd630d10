"""The slurm tier: real jobs on a one-node Slurm (`make test-slurm` starts it, runs this, stops it).

Jobs run the tiny stage-1 config as two CPU tasks (DDP on gloo) at width 32 on a small shard set in tmp.
Skips, with the reason, where no Slurm is running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Read at import: autouse fixtures may clear SLURM_* variables before each test.
SLURM_CONF = os.environ.get("SLURM_CONF") or str(ROOT / ".slurm" / "slurm.conf")
TOTAL = 300  # optimizer steps of the requeue test: long enough for the signal to arrive mid-run
TINY = [
    "--model.init_args.tokenizer.width=32",
    "--model.init_args.tokenizer.heads=2",
    "--model.init_args.tokenizer.enc_depth=1",
    "--model.init_args.tokenizer.dec_depth=1",
    "--data.init_args.batch_size=8",
    "--data.init_args.val_batch_size=32",
    "--data.init_args.num_workers=1",
    "--data.init_args.batches_per_epoch=1000",
    "--trainer.log_every_n_steps=1",
]


def _env(**extra: str) -> dict[str, str]:
    """This environment without SLURM_* job variables (pytest may itself run inside a job), plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if Path(SLURM_CONF).is_file():
        env["SLURM_CONF"] = SLURM_CONF
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", _env()), **kw
    )


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sbatch") is None:
        pytest.skip(
            "Slurm is not installed: `make test-slurm` installs it (apt, as root) and starts a cluster"
        )
    info = _run(["sinfo", "-h", "-o", "%t"], timeout=30)
    if info.returncode != 0 or not re.search(r"idle|mix|alloc", info.stdout):
        pytest.skip(
            f"no running Slurm (sinfo: {(info.stdout + info.stderr).strip()!r}): run `make test-slurm`"
        )


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train and 2 val shards: every rank gets a val shard."""
    out = tmp_path_factory.mktemp("slurm-shards")
    cmd = [str(BIN / "vlt"), "data", "synthetic", "--out", str(out), "--n_train", "256", "--n_val", "128"]
    done = _run([*cmd, "--shard_size", "64", "--progress", "false"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _data(shards: Path) -> list[str]:
    return [f"--data.init_args.train=[{shards}/train-*.tar]", f"--data.init_args.val={shards}/val-*.tar"]


def _submitted(out: str) -> tuple[str, Path]:
    """Job id and run directory printed by the submit helper."""
    job = re.search(r"submitted job (\d+)", out)
    run_dir = re.search(r"run directory (\S+)", out)
    assert job and run_dir, out
    return job.group(1), Path(run_dir.group(1))


def _state(job: str) -> str:
    shown = _run(["scontrol", "show", "job", "-o", job], timeout=30).stdout
    found = re.search(r"JobState=(\S+)", shown)
    return found.group(1) if found else "UNKNOWN"


def _wait(predicate, what: str, timeout: float = 600, log: Path | None = None, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def _wait_done(job: str, log: Path) -> str:
    active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"}
    return _wait(lambda: (s := _state(job)) not in active and s, f"job {job} to end", log=log)


def _counters(path: Path) -> tuple[int, int, int]:
    """(global step, AdamW step count, EMA updates) stored in a checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    adam = int(next(iter(ckpt["optimizer_states"][0]["state"].values()))["step"])
    return int(ckpt["global_step"]), adam, int(ckpt["averaging_state"]["n_averaged"])


def _scalar_steps(event_file: Path, prefix: str) -> list[int]:
    """Steps of the first scalar whose tag starts with prefix in one event file ([] if none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    acc.Reload()
    tags = sorted(t for t in acc.Tags()["scalars"] if t.startswith(prefix))
    return [e.step for e in acc.Scalars(tags[0])] if tags else []


def test_make_train_tokenizer_on_slurm(cluster: None, shards: Path, tmp_path: Path) -> None:
    args = [f"--runs_dir={tmp_path}", "--name=tiny-ddp", *_data(shards), *TINY]
    args += ["--trainer.max_steps=20", "--trainer.val_check_interval=20"]
    make = [
        "make",
        "--no-print-directory",
        "train-tokenizer",
        "LAUNCH=slurm",
        "GPUS=0",
        "DEVICES=2",
        "NODES=1",
        f"VENV={BIN.parent}",
        f"SYNTHETIC={shards}/info.json",
        f"PHOTOS={shards}/train-000000.tar",  # any existing file satisfies the data prerequisite
        "ARGS=" + " ".join(args),
    ]
    done = _run(make, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    job, run_dir = _submitted(done.stdout)
    assert run_dir == tmp_path / "tiny-ddp"
    log = run_dir / f"slurm-{job}.out"
    state = _wait_done(job, log)
    text = log.read_text()
    assert "--trainer.num_nodes=1 --trainer.devices=2" in text and "Starting with 2 processes" in text
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    assert events and max(max(_scalar_steps(e, "train/loss"), default=-1) for e in events) == 19
    assert _counters(run_dir / "checkpoints" / "last.ckpt")[0] == 20
    assert state == "COMPLETED", text[-4000:]


def test_signal_requeues_and_resumes_exactly(cluster: None, shards: Path, tmp_path: Path) -> None:
    args = ["fit", "-c", str(ROOT / "conf/tokenizer/tiny.yaml"), f"--runs_dir={tmp_path}", "--name=requeue"]
    args += [*_data(shards), *TINY, f"--trainer.max_steps={TOTAL}", "--trainer.limit_val_batches=0"]
    env = _env(GPUS="0", DEVICES="2", NODES="1", VLT=str(BIN / "vlt"))
    done = _run([str(ROOT / "scripts/slurm/submit.sh"), *args], env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    job, run_dir = _submitted(done.stdout)
    log = run_dir / f"slurm-{job}.out"

    # Lightning's handlers live in the srun tasks (the batch shell has none): signal the job steps.
    armed = "RequeueAtStepEnd armed"
    _wait(lambda: log.exists() and armed in log.read_text(), "training to start", log=log, poll=0.1)
    time.sleep(2)
    assert _run(["scancel", "--signal=USR1", job], timeout=30).returncode == 0
    pattern = re.compile(r"saved (\S+hpc_ckpt_1\.ckpt) at global step (\d+)")
    _wait(lambda: pattern.search(log.read_text()) or _state(job) != "RUNNING", "the hpc checkpoint", log=log)
    saved = pattern.search(log.read_text())
    assert saved, f"job {job} ended without an hpc checkpoint:\n{log.read_text()[-4000:]}"
    _wait(lambda: _state(job) == "PENDING", "the requeue", log=log)
    # Slurm holds a requeued job (BeginTime ~2 min ahead): release it now.
    assert _run(["scontrol", "update", f"jobid={job}", "StartTime=now"], timeout=30).returncode == 0
    state = _wait_done(job, log)

    step = int(saved.group(2))
    assert 0 < step < TOTAL
    text = log.read_text()
    assert f"job {job} restart 1" in text
    assert f"Restoring states from the checkpoint path at {saved.group(1)}" in text
    assert re.search(r"Restarts=1\b", _run(["scontrol", "show", "job", job], timeout=30).stdout)
    # Optimizer, EMA and step counter agree at the preemption point and at the end: no step lost or repeated.
    assert _counters(Path(saved.group(1))) == (step, step, step)
    assert _counters(run_dir / "checkpoints" / "last.ckpt") == (TOTAL, TOTAL, TOTAL)
    # TensorBoard, one event file per job start: the learning rate (logged at each step's start) covers
    # 0..TOTAL-1 exactly once across the two; the loss of the last step before the exit is not written.
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 2
    assert [_scalar_steps(e, "lr-") for e in events] == [list(range(step)), list(range(step, TOTAL))]
    losses = [x for e in events for x in _scalar_steps(e, "train/loss")]
    assert len(losses) == len(set(losses)) and set(range(step, TOTAL)) <= set(losses)
    assert state == "COMPLETED", text[-4000:]


def test_plain_fit_is_not_a_slurm_job(cluster: None, shards: Path, tmp_path: Path) -> None:
    """With srun on PATH but no SLURM_* variables: no auto-requeue, and a stale run dir is refused."""
    cmd = [str(BIN / "vlt"), "fit", "-c", str(ROOT / "conf/tokenizer/tiny.yaml"), f"--runs_dir={tmp_path}"]
    cmd += ["--name=plain", *_data(shards), *TINY, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    cmd += ["--data.init_args.num_workers=0"]
    first = _run(cmd, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    output = first.stdout + first.stderr
    assert "SLURM auto-requeueing enabled" not in output and "requeue armed" not in output
    assert not list((tmp_path / "plain").glob("hpc_ckpt_*.ckpt"))
    assert (tmp_path / "plain" / "checkpoints" / "last.ckpt").is_file()

    again = _run(cmd, cwd=tmp_path)
    assert again.returncode != 0 and "already holds outputs" in again.stderr
