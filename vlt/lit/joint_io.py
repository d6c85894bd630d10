"""Checkpoint traffic of the joint fine-tune: read the stage checkpoints in, write stage checkpoints out.

Letters: N slots, K merged tokens, C channels.

The joint system starts from a stage-1 (LitTokenizer) and a stage-2 (LitDiT) checkpoint and hands
back the same two kinds, so everything downstream (`vlt sample`, the budget curves, another stage-2
run) takes the fine-tuned pair without knowing a joint stage exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch

from vlt.checkpoints import load_checkpoint

if TYPE_CHECKING:
    from vlt.lit.joint import LitJoint


def _load(path: str) -> dict:
    return load_checkpoint(path)  # weights_only=True; mmap keeps paper-scale files cheap to open twice


def read_hparams(path: str | None) -> dict:
    """The hyper-parameters stored in a stage checkpoint ({} without a path)."""
    return dict(_load(path).get("hyper_parameters", {})) if path else {}


def _prefixed(state: dict, prefix: str) -> dict:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def init_weights(model: LitJoint) -> None:
    """Load the stage-1 and stage-2 weights named in the hparams, then check the pattern contract.

    The frozen stage-1 alignment encoder (kind "stage1") becomes a copy of the loaded tokenizer; the
    running latent statistics start from the stage-2 model's latent_mean / latent_std.
    """
    hp = model.hparams
    if hp.init_from_tokenizer:
        state = _load(hp.init_from_tokenizer)["state_dict"]
        model.tokenizer.load_state_dict(_prefixed(state, "tokenizer."))
        model.merger.load_state_dict(_prefixed(state, "merger."))
    if hasattr(model.target, "copy_from"):
        model.target.copy_from(model.tokenizer)
    if hp.init_from_dit:
        state = _load(hp.init_from_dit)["state_dict"]
        model.dit.load_state_dict(_prefixed(state, "dit."))
        with torch.no_grad():
            for k in model.ks:
                getattr(model, f"assign_{k}").copy_(state[f"assign_{k}"])
            model.latent_mean.copy_(state["latent_mean"])
            model.latent_var.copy_(state["latent_std"].float().square())
    model.check_contract()


def _save(module: L.LightningModule, path: Path, **extra) -> None:
    state = {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
    ckpt = {"state_dict": state, "hyper_parameters": dict(module.hparams), **extra}
    torch.save({**ckpt, "pytorch-lightning_version": L.__version__}, path)


def export_stages(model: LitJoint, out: Path) -> dict[str, Path]:
    """tokenizer.ckpt + dit.ckpt + merge_table.json of the model's current weights under `out`."""
    from vlt.lit.dit import LitDiT
    from vlt.lit.tokenizer import LitTokenizer

    hp = model.hparams
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tokenizer": out / "tokenizer.ckpt", "dit": out / "dit.ckpt", "table": out / "merge_table.json"}
    tok = LitTokenizer(tokenizer=hp.tokenizer, merge=hp.merge, loss=hp.loss, optim=hp.optim)
    tok.tokenizer.load_state_dict(model.tokenizer.state_dict())
    tok.merger.load_state_dict(model.merger.state_dict())
    table = tok.merge_table()
    _save(tok, paths["tokenizer"], merge_table=table.to_dict() if table is not None else None)
    dit = LitDiT(
        dit=hp.dit, tokenizer=str(paths["tokenizer"].resolve()), ks=model.ks, k_cycle=model.k_cycle,
        flow=hp.flow, optim=hp.optim,
    )  # fmt: skip
    dit.dit.load_state_dict(model.dit.state_dict())
    with torch.no_grad():
        for k in model.ks:
            getattr(dit, f"assign_{k}").copy_(getattr(model, f"assign_{k}"))
        dit.latent_mean.copy_(model.latent_mean)
        dit.latent_std.copy_(model.latent_std)
    _save(dit, paths["dit"])
    model.table().save(paths["table"])
    return paths
