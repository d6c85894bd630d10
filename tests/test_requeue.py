"""SLURM preemption in one process: SIGUSR1, hpc checkpoint at a step end, exact resume.

Lightning is made to see a one-task SLURM job through srun's environment variables; `scontrol requeue`
is replaced by a recorder. The real multi-process path runs in tests/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vlt import requeue, runs

SLURM_TASK = {
    "SLURM_JOB_ID": "7",
    "SLURM_JOB_NAME": "vlt-test",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


class Tiny(L.LightningModule):
    """A linear regression that records the global step of every training step it runs."""

    def __init__(self, *, signal_at: int | None = None, during: str = "optimizer_step") -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.signal_at, self.during = signal_at, during
        self.steps: list[int] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        first_micro_batch = self.global_step not in self.steps
        self.steps.append(self.global_step)
        if self.during == "training_step" and self.global_step == self.signal_at and first_micro_batch:
            # Half-way through a gradient accumulation: nothing of this step may be saved yet.
            os.kill(os.getpid(), signal.SIGUSR1)
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.during == "optimizer_step" and self.global_step == self.signal_at:
            # What Slurm does 90 s before the time limit, at the worst moment: the optimizer has stepped,
            # the step counter and the EMA have not. Lightning's own handler saves (3, 4, 3) here.
            os.kill(os.getpid(), signal.SIGUSR1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _trainer(root: Path, max_steps: int, accumulate: int = 1) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EMAWeightAveraging(decay=0.9)],
    )


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _counters(path: Path) -> tuple[int, int, int]:
    """(global step, AdamW's step count, EMA updates) stored in a checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    adam = int(ckpt["optimizer_states"][0]["state"][0]["step"])
    return ckpt["global_step"], adam, int(ckpt["averaging_state"]["n_averaged"])


def test_prepare_fit_arms_requeue_only_under_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    plain = _trainer(tmp_path / "plain", 1)
    assert runs.prepare_fit(plain, ckpt_path=None) is None
    assert not any(isinstance(c, requeue.RequeueAtStepEnd) for c in plain.callbacks)
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    slurm = _trainer(tmp_path / "slurm", 1)
    runs.prepare_fit(slurm, ckpt_path=None)
    assert isinstance(slurm.callbacks[-1], requeue.RequeueAtStepEnd)


@pytest.mark.parametrize(("accumulate", "during"), [(1, "optimizer_step"), (2, "training_step")])
def test_sigusr1_checkpoint_at_step_end_resumes_exactly(
    accumulate: int, during: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    requeued: list[bool] = []
    monkeypatch.setattr(requeue, "requeue_job", lambda env=None: requeued.append(True) or 0)
    root, total = tmp_path / "run", 9

    first, model = _trainer(root, total, accumulate), Tiny(signal_at=3, during=during)
    with pytest.raises(SystemExit):
        first.fit(model, _loader(), ckpt_path=runs.prepare_fit(first, ckpt_path=None))
    hpc = root / "hpc_ckpt_1.ckpt"
    assert requeued == [True] and hpc.is_file()
    assert first.global_step == 4  # the signalled step finished, no further step started
    assert _counters(hpc) == (4, 4, 4)

    # A new job in the same directory is refused; the requeued job resumes from the hpc checkpoint.
    with pytest.raises(runs.StaleRunError):
        runs.prepare_fit(_trainer(root, total, accumulate), ckpt_path=None)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second, resumed = _trainer(root, total, accumulate), Tiny()
    path = runs.prepare_fit(second, ckpt_path=None)
    assert path == str(hpc)
    second.fit(resumed, _loader(), ckpt_path=path)
    # Each optimizer step ran its micro-batches exactly once, over the two jobs.
    assert model.steps + resumed.steps == [step for step in range(total) for _ in range(accumulate)]
    second.save_checkpoint(root / "final.ckpt")
    assert _counters(root / "final.ckpt") == (total, total, total)
