"""NaN/inf stop the run at that step with a message and never become a checkpoint; skip is opt-in."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.robustness.conftest import write_shard
from vlt.callbacks.finite import FiniteGuard, NonFiniteError
from vlt.checkpoints import load_checkpoint
from vlt.data import WebDataModule
from vlt.lit import LitTokenizer
from vlt.models.tokenizer import TokenizerConfig
from vlt.specs import MergeSpec, OptimSpec

TINY = TokenizerConfig(
    width=32, heads=2, enc_depth=1, dec_depth=1, image_size=16, patch_size=4, n_slots=8, channels=4
)


def trainer(tmp_path, *callbacks, steps: int = 30) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["nested", "lgm"])
def test_absurd_learning_rate_stops_and_keeps_the_last_finite_checkpoint(tmp_path, mode):
    shards = write_shard(tmp_path / "train-0.tar", 16)
    data = WebDataModule(train=str(shards), image_size=16, batch_size=8, num_workers=0, batches_per_epoch=5)
    model = LitTokenizer(
        tokenizer=TINY, merge=MergeSpec(mode=mode, grid=[2, 4, 8], embed_dim=8, full_k_fraction=0.0),
        optim=OptimSpec(lr=1e12, warmup_steps=1),
    )  # fmt: skip
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=1)
    fit = trainer(tmp_path, ckpts, FiniteGuard())
    with pytest.raises(FloatingPointError, match=r"step \d+.*(lower model\.init_args\.optim\.lr)") as err:
        fit.fit(model, datamodule=data)
    last = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert isinstance(err.value, NonFiniteError) or "merge embeddings" in str(err.value)


class Spiky(L.LightningModule):
    """A regression whose loss is NaN on the batches listed in `bad`."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.net, self.bad = nn.Linear(4, 1), bad

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        loss = loss * float("nan") if batch_idx in self.bad else loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8)


def test_stop_names_the_step_and_the_loss_term(tmp_path):
    with pytest.raises(NonFiniteError, match=r"'train/loss': nan.*training step 3.*likely causes"):
        trainer(tmp_path, FiniteGuard()).fit(Spiky({3}), loader())


def test_skip_policy_skips_isolated_bad_batches_and_counts_them(tmp_path):
    guard = FiniteGuard(policy="skip")
    fit = trainer(tmp_path, guard, steps=8)
    model = Spiky({2, 5})
    fit.fit(model, loader())
    assert guard.skipped == 2 and fit.global_step == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert fit.callback_metrics["train/nonfinite_skipped"].item() == 2
    with pytest.raises(NonFiniteError):  # a run of bad batches is not isolated
        trainer(tmp_path, FiniteGuard(policy="skip", max_consecutive_skips=2), steps=8).fit(
            Spiky({1, 2, 3}), loader()
        )
