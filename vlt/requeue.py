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
`StopAtStepEnd`, attached to every fit, does the same for SIGTERM and SIGINT (a kill, Ctrl-C, a
scheduler's cancel) without the requeue, and exits non-zero so that scripts see the run did not finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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


class StepEndSignal(Callback):
    """Record signals; at the end of the next optimizer step (all ranks agreeing) call `act`."""

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.signums = tuple(signums)
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _request(self, signum: int, frame: Any) -> None:
        # Async-signal context: only set a flag, act at the next step boundary.
        self.requested = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the Trainer registered Lightning's handlers, which it restores itself at teardown.
        self.requested = None
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._request)
        names = ", ".join(signal.Signals(s).name for s in self.signums)
        rank_zero_info(f"{type(self).__name__} armed: {names} checkpoint at the next optimizer step end")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.restore()

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Gradients of a partial accumulation are not in checkpoints: wait for the optimizer step.
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        # Every rank takes part in this reduction every step, so all decide together.
        if not trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"{type(self).__name__}: saved {path} at global step {trainer.global_step}")
        self.act(trainer)
        # Stop at once, as Lightning does on SIGTERM: no epoch-end hooks (evaluations, a ModelCheckpoint file
        # newer than the hpc one) run after the signal.
        for logger in trainer.loggers:
            logger.finalize("finished")
        raise SIGTERMException(self.exit_code())

    def act(self, trainer: L.Trainer) -> None:
        """What to do after the checkpoint, before the process exits."""

    def exit_code(self) -> int:
        return 0


class RequeueAtStepEnd(StepEndSignal):
    """On the requeue signal: save the hpc checkpoint at the next optimizer-step end, requeue, exit."""

    def __init__(self, *, signum: int = signal.SIGUSR1) -> None:
        super().__init__((signum,))

    def act(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            rank_zero_info(f"requeue: scontrol requeue exited with {requeue_job()}")


class StopAtStepEnd(StepEndSignal):
    """SIGTERM / SIGINT: save `hpc_ckpt_<n>.ckpt` at the next optimizer-step end and exit 128 + signal.

    The checkpoint lands where `--ckpt_path=last` and the stale-run guard find it; the exit code
    (143 for SIGTERM, 130 for SIGINT) tells scripts that check it that the run did not finish. A
    second signal, or no step boundary within `grace_s` seconds (a stalled data stream, a long
    validation), stops at once without a checkpoint (KeyboardInterrupt: Lightning exits with 1).
    """

    def __init__(
        self, *, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), grace_s: float = 60.0
    ) -> None:
        super().__init__(signums)
        self.grace_s = grace_s
        self._timer: threading.Timer | None = None

    def _request(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            self.restore()
            print(
                f"{signal.Signals(signum).name} again, or no optimizer step ended within {self.grace_s:g} s "
                "of the first: stopping without a checkpoint",
                file=sys.stderr,
                flush=True,
            )
            raise KeyboardInterrupt
        self.requested = signum
        main = threading.main_thread().ident
        self._timer = threading.Timer(self.grace_s, signal.pthread_kill, (main, signum))
        self._timer.daemon = True
        self._timer.start()

    def restore(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().restore()

    def act(self, trainer: L.Trainer) -> None:
        self.restore()

    def exit_code(self) -> int:
        return 128 + int(self.requested or signal.SIGTERM)
