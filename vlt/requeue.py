"""SLURM preemption at an optimizer-step boundary.

Lightning's own SIGUSR1 handler (SLURMEnvironment auto-requeue) saves `hpc_ckpt_<n>.ckpt` from inside
the signal handler, i.e. wherever the main thread happens to be: between `optimizer.step()` and the
step counter, before the EMA update of that step, or half-way through gradient accumulation. The
resumed job then repeats or loses a step, and under DDP the ranks can enter the checkpoint's barrier
while a peer is still in the gradient all-reduce. This callback keeps Lightning's file name, location
and requeue command but only *records* the signal; the checkpoint is written at the end of the next
optimizer step, after every other callback's `on_train_batch_end` (EMA included), once all ranks
agree that a signal arrived. Training then stops at once (SIGTERMException, Lightning's own exit on
SIGTERM), so no step runs or is logged twice and no epoch-end hook runs in the job's last minute.

Attached automatically by `vlt.runs.prepare_fit` when Lightning uses SLURMEnvironment(auto_requeue=True).
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


def requeue_job(env: dict[str, str] | None = None) -> int:
    """`scontrol requeue` this job (array jobs by array id and task); returns scontrol's exit status."""
    env = dict(os.environ) if env is None else env
    array_id = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_id}_{env['SLURM_ARRAY_TASK_ID']}" if array_id else env["SLURM_JOB_ID"]
    return subprocess.call(["scontrol", "requeue", job])


class RequeueAtStepEnd(Callback):
    """On the requeue signal: save the hpc checkpoint at the next optimizer-step end, requeue, exit."""

    def __init__(self, *, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.requested = False
        self._previous: Any = None

    def _request(self, signum: int, frame: Any) -> None:
        # Async-signal context: only set a flag, act at the next step boundary.
        self.requested = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the Trainer registered Lightning's handler, which it restores itself at teardown.
        self.requested = False
        self._previous = signal.signal(self.signum, self._request)
        rank_zero_info(f"requeue armed: signal {self.signum} saves an hpc checkpoint at the next step end")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Gradients of a partial accumulation are not in checkpoints: wait for the optimizer step.
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        # Every rank takes part in this reduction every step, so all decide together.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"requeue: saved {path} at global step {trainer.global_step}")
        if trainer.is_global_zero:
            rank_zero_info(f"requeue: scontrol requeue exited with {requeue_job()}")
        # Stop at once, as Lightning does on SIGTERM: no epoch-end hooks (evaluations, a ModelCheckpoint file
        # newer than the hpc one) run in the minute before Slurm kills the job.
        for logger in trainer.loggers:
            logger.finalize("finished")
        raise SIGTERMException()
