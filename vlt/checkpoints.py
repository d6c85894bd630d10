"""Loading checkpoints that users hand in: never running code from a file, and knowing which stage it is.

Every checkpoint path that comes from a config or the command line is read by `load_checkpoint`:
`torch.load(weights_only=True)`, with vlt's own config dataclasses allow-listed (they are plain
dataclasses the stage modules store as hyperparameters). A file whose pickle names anything else (a
crafted checkpoint calling `os.system`, say) is refused with `UnsafeCheckpointError`, which names the
file and the config key it came from. A checkpoint of another stage than the key needs is refused with
`WrongStageError` at setup, before any step runs.

Stages: "tokenizer" (LitTokenizer, stage 1), "dit" (LitDiT, stage 2), "joint" (LitJoint, stage 3).
A checkpoint carries its stage in `ckpt["vlt_stage"]`; older ones are recognised by their
hyperparameters. `newest_loadable` backs `--ckpt_path=last`: it skips damaged files (a write cut short
by a kill) and falls back to the newest checkpoint that loads.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)
Stage = Literal["tokenizer", "dit", "joint"]
STAGES: tuple[str, ...] = ("tokenizer", "dit", "joint")
STAGE_KEY = "vlt_stage"
# Where a checkpoint of each stage comes from, for error messages.
STAGE_SOURCE = {
    "tokenizer": "a stage-1 run (`vlt fit -c conf/tokenizer/...`, runs/<name>/checkpoints/last.ckpt)",
    "dit": "a stage-2 run (`vlt fit -c conf/dit/...`) or a joint export (runs/<name>/export/dit.ckpt)",
    "joint": "a stage-3 run (`vlt fit -c conf/joint/...`)",
}


class CheckpointError(ValueError):
    """A checkpoint file that vlt refuses to use (named, with the config key and the fix)."""


class UnsafeCheckpointError(CheckpointError):
    """The file is not a plain weights file: its pickle would run or import code."""


class WrongStageError(CheckpointError):
    """The file is a checkpoint of another stage than the one this config key needs."""


def allow_project_classes() -> None:
    """Register vlt's config dataclasses (the only classes a vlt checkpoint pickles) with torch's
    weights-only unpickler. Imports no Lightning."""
    from vlt.models.dit import DiTConfig
    from vlt.models.tokenizer import TokenizerConfig
    from vlt.objectives.flow import FlowSpec
    from vlt.specs import AlignEncoderSpec, JointSpec, LoRASpec, LossSpec, MergeSpec, OptimSpec, PartLR

    classes = [TokenizerConfig, DiTConfig, FlowSpec, MergeSpec, LossSpec, OptimSpec, JointSpec, PartLR]
    torch.serialization.add_safe_globals([*classes, AlignEncoderSpec, LoRASpec])


def _where(path: str | os.PathLike, config_key: str | None) -> str:
    return f"{config_key}={path}" if config_key else f"checkpoint {path}"


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expect: Stage | None = None,
    config_key: str | None = None,
    mmap: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint dict with `weights_only=True`; check its stage when `expect` is given.

    Raises:
        CheckpointError: the file is missing, damaged or not a checkpoint dict.
        UnsafeCheckpointError: the pickle references code outside the allow-list.
        WrongStageError: the checkpoint is of another stage than `expect`.
    """
    where = _where(path, config_key)
    if not Path(path).is_file():
        raise CheckpointError(f"{where}: no such file; check the path (cwd {os.getcwd()})")
    allow_project_classes()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{where}: refused to load: the file is not a plain weights file ({reason}). vlt loads "
            "checkpoints with weights_only=True and never runs code from a file; use a checkpoint "
            "written by vlt, or re-save a trusted one as a state_dict of tensors."
        ) from exc
    except Exception as exc:  # zip, mmap and storage errors of a damaged or foreign file
        raise CheckpointError(
            f"{where}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}); the file is "
            "damaged (a write cut short?) or not a torch checkpoint"
        ) from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{where}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    if expect is not None:
        check_stage(ckpt, expect, where=where)
    return ckpt


def checkpoint_stage(ckpt: dict[str, Any]) -> str:
    """ "tokenizer", "dit", "joint" or "unknown": the explicit marker, else read off the hyperparameters."""
    marker = ckpt.get(STAGE_KEY)
    if marker in STAGES:
        return str(marker)
    hp = ckpt.get("hyper_parameters") or {}
    if "init_from_dit" in hp:
        return "joint"
    if "dit" in hp and "cache" in hp:
        return "dit"
    if "merge" in hp and "dit" not in hp:
        return "tokenizer"
    return "unknown"


def check_stage(ckpt: dict[str, Any], expect: str, *, where: str) -> None:
    """Raise WrongStageError when `ckpt` is not a checkpoint of stage `expect`."""
    stage = checkpoint_stage(ckpt)
    if stage != expect:
        what = "not a vlt stage checkpoint" if stage == "unknown" else f"a stage '{stage}' checkpoint"
        raise WrongStageError(
            f"{where} is {what}, but a stage '{expect}' checkpoint is needed here: point it at "
            f"{STAGE_SOURCE[expect]}"
        )


def newest_loadable(paths: Iterable[Path]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint (by mtime) that loads, and a note for each newer one that did not."""
    ordered = sorted(paths, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    damaged: list[str] = []
    for path in ordered:
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        if damaged:
            log.warning("falling back to %s: newer checkpoints are unusable: %s", path, " | ".join(damaged))
        return path, damaged
    return None, damaged
