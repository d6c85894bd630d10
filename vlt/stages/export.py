"""Exports and loading of the stage objects, with no Lightning import.

    vlt export runs/dit-tiny/checkpoints/last.ckpt exports/dit-tiny
    gen = vlt.load("exports/dit-tiny")                  # LatentGenerator (decodes on its own)
    tok = vlt.load("exports/dit-tiny", part="tokenizer")  # its tokenizer
    tok = vlt.load("runs/tokenizer-tiny/checkpoints/last.ckpt")  # checkpoints load the same way

An export is one folder per object, the layout model hubs upload and download as is:
    config.json        {"format": "vlt", "version": 1, "kind": "tokenizer" | "generator", configs...}
    model.safetensors  the weights (a checkpoint's saved weights: the EMA average when EMA was on)
    pattern.json       the global merge pattern, readable (the same values are in the weights)

Checkpoints are read by `vlt.checkpoints.load_checkpoint` (`torch.load(weights_only=True)`): only
tensors, containers and vlt's own allow-listed config dataclasses are rebuilt, never arbitrary objects.
A checkpoint names its stage in `vlt_stage` ("tokenizer", "dit" or "joint"); stage 2 and 3
checkpoints hold a generator (`generator.*` keys, tokenizer included), stage 1 checkpoints the
training-time tokenizer + merger.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_model, save_model

from vlt.checkpoints import STAGES, WrongStageError, checkpoint_stage, load_checkpoint
from vlt.models.dit import DiTConfig
from vlt.models.merging import Merger
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec
from vlt.stages.generator import LatentGenerator
from vlt.stages.tokenizer import VariableLengthTokenizer

FORMAT, VERSION = "vlt", 1
Part = Literal["tokenizer", "generator"]


# --- checkpoints ---
def read_checkpoint(path: str | Path, *, config_key: str | None = None) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, loaded safely (`vlt.checkpoints.load_checkpoint`)."""
    return load_checkpoint(path, config_key=config_key)


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def tokenizer_from_checkpoint(ckpt: dict[str, Any]) -> VariableLengthTokenizer:
    """Stage 1: the tokenizer with the pattern cut from the checkpoint's own (EMA) merge embeddings."""
    hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    cfg: TokenizerConfig = hp["tokenizer"]
    merger = Merger(n_slots=cfg.n_slots, channels=cfg.channels, **hp["merge"].merger_kwargs())
    merger.load_state_dict(_prefixed(state, "merger."))
    tok = VariableLengthTokenizer(cfg, merger.pattern(), fill=merger.fill())
    tok.net.load_state_dict(_prefixed(state, "tokenizer."))
    return tok.eval()


def generator_config(hp: dict[str, Any]) -> dict[str, Any]:
    """The LatentGenerator arguments a stage-2 or joint module keeps in its hyper-parameters."""
    # Stage 2 names the stage-1 file `tokenizer` and its config `tokenizer_config`; stage 3 trains the
    # tokenizer and keeps its config as `tokenizer`.
    tokenizer = (
        hp["tokenizer"] if isinstance(hp.get("tokenizer"), TokenizerConfig) else hp.get("tokenizer_config")
    )
    return {
        "dit": hp["dit"],
        "flow": hp["flow"],
        "tokenizer": tokenizer,
        "pattern": {"n": hp["dit"].n_slots, "ks": list(hp["ks"]), "kind": hp["pattern_kind"]},
        "prior_grid": hp.get("prior_grid"),
    }


def build_generator(dit: DiTConfig, pattern: dict, **kwargs: Any) -> LatentGenerator:
    """A generator of the right shapes (placeholder values, to be filled by a state dict)."""
    shape = MergePattern.contiguous(pattern["n"], pattern["ks"], kind=pattern["kind"])
    return LatentGenerator(dit, shape, **kwargs)


def generator_from_checkpoint(ckpt: dict[str, Any]) -> LatentGenerator:
    gen = build_generator(**generator_config(ckpt["hyper_parameters"]))
    gen.load_state_dict(_prefixed(ckpt["state_dict"], "generator."))
    return gen.eval()


# --- export folders ---
def export(obj: VariableLengthTokenizer | LatentGenerator, out: str | Path) -> Path:
    """Write `obj` as an export folder (config.json, model.safetensors, pattern.json); returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, LatentGenerator):
        config = {
            "kind": "generator",
            "dit": asdict(obj.dit.cfg),
            "flow": asdict(obj.spec),
            "tokenizer": asdict(obj.tokenizer.cfg) if obj.tokenizer is not None else None,
            "prior_grid": obj.k_grid.tolist() if obj.has_prior else None,
        }
    elif isinstance(obj, VariableLengthTokenizer):
        config = {"kind": "tokenizer", "tokenizer": asdict(obj.cfg)}
    else:
        raise TypeError(f"cannot export a {type(obj).__name__}: expected a tokenizer or a generator")
    pattern = obj.pattern
    config["pattern"] = {"n": pattern.n, "ks": pattern.ks, "kind": pattern.kind} if pattern else None
    (out / "config.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, **config}, indent=2))
    if pattern is not None:
        pattern.save(out / "pattern.json")
    save_model(obj, str(out / "model.safetensors"))  # shared tensors (the one pattern) stored once
    return out


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a vlt export: no config.json (write one with `vlt export`)")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{file} is not a vlt export of version {VERSION}")
    return config


def _from_folder(folder: Path) -> VariableLengthTokenizer | LatentGenerator:
    config = _read_config(folder)
    pattern = MergePattern.load(folder / "pattern.json") if config["pattern"] else None
    tok = TokenizerConfig(**config["tokenizer"]) if config["tokenizer"] else None
    if config["kind"] == "tokenizer":
        obj: Any = VariableLengthTokenizer(tok, pattern)
    else:
        flow = config["flow"]
        flow["cfg_interval"] = tuple(flow["cfg_interval"]) if flow["cfg_interval"] else None
        obj = LatentGenerator(
            DiTConfig(**config["dit"]), pattern, flow=FlowSpec(**flow), tokenizer=tok,
            prior_grid=config["prior_grid"],
        )  # fmt: skip
    load_model(obj, str(folder / "model.safetensors"))
    return obj.eval()


def load(path: str | Path, *, part: Part | None = None) -> VariableLengthTokenizer | LatentGenerator:
    """The stage object in an export folder or a stage checkpoint.

    Args:
        path: an export folder (`vlt export`) or a `.ckpt` of stage 1, 2 or 3.
        part: "tokenizer" returns a generator's tokenizer; None returns what the path holds.
    """
    path = Path(path)
    if path.is_dir():
        obj = _from_folder(path)
    else:
        ckpt = read_checkpoint(path)
        stage = checkpoint_stage(ckpt)
        if stage not in STAGES:
            raise WrongStageError(
                f"{path} is not a vlt stage checkpoint (no stage marker, no stage hyper-parameters)"
            )
        obj = tokenizer_from_checkpoint(ckpt) if stage == "tokenizer" else generator_from_checkpoint(ckpt)
    if part == "tokenizer" and isinstance(obj, LatentGenerator):
        if obj.tokenizer is None:
            raise ValueError(f"{path} holds a generator without a tokenizer")
        return obj.tokenizer
    if part is not None and not isinstance(
        obj, VariableLengthTokenizer if part == "tokenizer" else LatentGenerator
    ):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a {part}")
    return obj
