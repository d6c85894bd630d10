"""Run-directory policy: one fixed directory per run name, never reused by accident.

Every `vlt fit` writes to `runs_dir/name` (no timestamps, no version_N) so a preempted SLURM job that is
requeued finds its own checkpoints again. The price of a fixed directory is that a *new* run with an old
name would silently continue the old one: under `srun`, Lightning resumes from any `hpc_ckpt_*.ckpt`
it finds in `default_root_dir`. This module decides, before fitting, which of three cases holds:

- a requeue of the same SLURM job (SLURM_RESTART_COUNT > 0): resume from the newest checkpoint of the run;
- an explicit resume (`--ckpt_path=last` or a path): allowed; "last" also considers hpc checkpoints,
  which Lightning's own "last" ignores (it would go back to an older ModelCheckpoint file);
- anything else on a directory that already holds checkpoints: stop with `StaleRunError`.

`python -m vlt.runs check RUN_DIR [--ckpt_path X]` runs the same check without a Trainer (the SLURM submit
helper calls it so a doomed job is refused before it queues).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

HPC_PATTERN = "hpc_ckpt_*.ckpt"


class StaleRunError(RuntimeError):
    """A new run was pointed at a run directory that already holds another run's checkpoints."""


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints a resume could pick up: hpc_ckpt_*.ckpt in the run dir and checkpoints/*.ckpt."""
    root = Path(run_dir)
    found = [*root.glob(HPC_PATTERN), *(root / "checkpoints").glob("*.ckpt")]
    return sorted(p for p in found if p.is_file())


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The most recently written checkpoint of the run (the state a resume must continue from)."""
    found = run_checkpoints(run_dir)
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None


def slurm_restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often Slurm has requeued this job; 0 outside Slurm (no SLURM_JOB_ID) or on its first start."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return 0
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def resume_path(
    run_dir: str | os.PathLike, *, ckpt_path: str | None, env: Mapping[str, str] | None = None
) -> str | None:
    """The ckpt_path `fit` should use in run_dir, or raise StaleRunError for an accidental reuse.

    A requeue resumes from the newest checkpoint whatever the original job was told (its `--ckpt_path` is
    older than anything it wrote since); with nothing written yet it starts as the original job did.
    """
    newest = newest_checkpoint(run_dir)
    if slurm_restart_count(env) > 0:
        return str(newest) if newest is not None else ckpt_path
    if ckpt_path is None and newest is not None:
        names = ", ".join(str(p.relative_to(run_dir)) for p in run_checkpoints(run_dir)[:4])
        raise StaleRunError(
            f"run directory {run_dir} already holds checkpoints ({names}) of an earlier run, and this is "
            "not a requeue of that job: a new run there would silently resume or overwrite it. "
            f"Start a new run with --name=<new name>, resume this one with --ckpt_path=last, "
            f"or delete {run_dir}."
        )
    if ckpt_path == "last" and newest is not None:
        return str(newest)
    return ckpt_path


def uses_slurm_requeue(trainer: L.Trainer) -> bool:
    """True when Lightning runs this fit as a SLURM job with auto-requeue (the default under srun)."""
    # The same attribute Lightning's signal connector inspects; the strategy only has it for DDP.
    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and env.auto_requeue


def prepare_fit(trainer: L.Trainer, *, ckpt_path: str | None) -> str | None:
    """Check the run directory, pick the checkpoint to resume from, and make SLURM preemption exact.

    Returns the ckpt_path to pass to `trainer.fit`. Under SLURM auto-requeue it also attaches
    `RequeueAtStepEnd`, which moves Lightning's SIGUSR1 checkpoint to an optimizer-step boundary.
    """
    from vlt.requeue import RequeueAtStepEnd

    path = resume_path(trainer.default_root_dir, ckpt_path=ckpt_path)
    if uses_slurm_requeue(trainer) and not any(isinstance(c, RequeueAtStepEnd) for c in trainer.callbacks):
        # Appended last, so it runs after every other on_train_batch_end (EMA updates included).
        trainer.callbacks.append(RequeueAtStepEnd())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlt.runs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="exit 1 with a message if RUN_DIR must not be used by a new run")
    check.add_argument("run_dir")
    check.add_argument("--ckpt_path", default=None)
    args = parser.parse_args(argv)
    try:
        resume_path(args.run_dir, ckpt_path=args.ckpt_path)
    except StaleRunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
