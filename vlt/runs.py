"""Run-directory policy: one fixed directory per run name, never reused by accident.

Every `vlt fit` writes to `runs_dir/name` (no timestamps, no version_N) so a preempted SLURM job that is
requeued finds its own checkpoints again. The price of a fixed directory is that a *new* run with an old
name would silently continue the old one: under `srun`, Lightning resumes from any `hpc_ckpt_*.ckpt`
it finds in `default_root_dir`. This module decides, before fitting, which of three cases holds:

- a requeue of the same SLURM job (SLURM_RESTART_COUNT > 0): resume from the newest checkpoint of the run;
- an explicit resume (`--ckpt_path=last` or a path): allowed; "last" also considers hpc checkpoints,
  which Lightning's own "last" ignores (it would go back to an older ModelCheckpoint file), and falls
  back, with a warning, to the newest checkpoint that loads when newer ones are damaged;
- anything else on a directory that already holds another run's outputs (checkpoints, TensorBoard
  event files, budget curves): stop with `StaleRunError`, so two runs never mix in one directory.

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

from vlt.checkpoints import CheckpointError, newest_loadable

HPC_PATTERN = "hpc_ckpt_*.ckpt"
OUTPUT_PATTERNS = ("events.out.tfevents.*", "curves/*")  # what a run writes besides checkpoints


class StaleRunError(RuntimeError):
    """A new run was pointed at a run directory that already holds another run's checkpoints."""


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints a resume could pick up: hpc_ckpt_*.ckpt in the run dir and checkpoints/*.ckpt."""
    root = Path(run_dir)
    found = [*root.glob(HPC_PATTERN), *(root / "checkpoints").glob("*.ckpt")]
    return sorted(p for p in found if p.is_file())


def run_outputs(run_dir: str | os.PathLike) -> list[Path]:
    """Everything that marks the directory as used by a run: checkpoints, event files, curves."""
    root = Path(run_dir)
    found = [p for pattern in OUTPUT_PATTERNS for p in root.glob(pattern) if p.is_file()]
    return [*run_checkpoints(root), *sorted(found)]


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The most recently written checkpoint of the run that loads (the state a resume continues from).

    Damaged newer files (a write cut short by a kill) are skipped with a warning; if checkpoints exist
    but none loads, CheckpointError lists them.
    """
    found = run_checkpoints(run_dir)
    if not found:
        return None
    path, damaged = newest_loadable(found)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run_dir} loads: {' | '.join(damaged)}")
    return path


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
    if slurm_restart_count(env) > 0:
        newest = newest_checkpoint(run_dir)
        return str(newest) if newest is not None else ckpt_path
    used = run_outputs(run_dir)
    if ckpt_path is None and used:
        names = ", ".join(str(p.relative_to(run_dir)) for p in used[:4])
        raise StaleRunError(
            f"run directory {run_dir} already holds outputs ({names}) of an earlier run, and this is "
            "not a requeue of that job: a new run there would silently resume it or mix its curves "
            f"and events with the old ones. Start a new run with --name=<new name>, resume this one "
            f"with --ckpt_path=last, or delete {run_dir}."
        )
    if ckpt_path == "last":
        newest = newest_checkpoint(run_dir)
        return str(newest) if newest is not None else ckpt_path
    return ckpt_path


def uses_slurm_requeue(trainer: L.Trainer) -> bool:
    """True when Lightning runs this fit as a SLURM job with auto-requeue (the default under srun)."""
    # The same attribute Lightning's signal connector inspects; the strategy only has it for DDP.
    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and env.auto_requeue


def prepare_fit(trainer: L.Trainer, *, ckpt_path: str | None) -> str | None:
    """Check the run directory, pick the checkpoint to resume from, and make SLURM preemption exact.

    Returns the ckpt_path to pass to `trainer.fit`. It attaches the run's guards unless the config
    has them: `FiniteGuard` (NaN/inf stop the run, never saved), `LabelCheck` (labels fit the model),
    `StopAtStepEnd` (SIGTERM/SIGINT: a checkpoint at the next optimizer step, a non-zero exit) and,
    under SLURM auto-requeue, `RequeueAtStepEnd`, which moves Lightning's SIGUSR1 checkpoint to an
    optimizer-step boundary.
    """
    from vlt.callbacks.finite import FiniteGuard
    from vlt.callbacks.labels import LabelCheck
    from vlt.requeue import RequeueAtStepEnd, StopAtStepEnd

    path = resume_path(trainer.default_root_dir, ckpt_path=ckpt_path)
    wanted = [FiniteGuard, LabelCheck, StopAtStepEnd]
    if uses_slurm_requeue(trainer):
        wanted.append(RequeueAtStepEnd)
    for kind in wanted:
        # Appended last, so they run after every other on_train_batch_end (EMA updates included).
        if not any(isinstance(c, kind) for c in trainer.callbacks):
            trainer.callbacks.append(kind())
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
    except (StaleRunError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
