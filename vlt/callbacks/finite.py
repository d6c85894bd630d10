"""FiniteGuard: a non-finite loss, gradient or weight stops the run at that step, and is never saved.

Checked at three points, each before anything is lost:
- before the optimizer step (after backward, before clipping): the gradients. A NaN/inf loss makes
  them non-finite too, so the weights are still the last finite ones when the run stops;
- after the optimizer step: the weights (a finite gradient with an absurd learning rate can still
  overflow them);
- when a checkpoint is written: its floating-point tensors, so `last.ckpt` (and the top-k files,
  whose older entries are only deleted after a save succeeds) stay the last finite state.

policy="stop" (default) raises `NonFiniteError` with the step, the loss terms logged at that step
that are not finite, and the likely causes. policy="skip" drops the update of an isolated bad batch
instead (gradients cleared, so the optimizer leaves the weights alone), counts it, warns and logs
`train/nonfinite_skipped`; more than `max_consecutive_skips` bad batches in a row still stop.
Under DDP the gradients are already reduced and the weights identical, so every rank decides alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

log = logging.getLogger(__name__)
Policy = Literal["stop", "skip"]
POLICIES: tuple[str, ...] = ("stop", "skip")
CAUSES = (
    "likely causes: a learning rate too high for this model (lower model.init_args.optim.lr or "
    "lengthen warmup_steps), exploding gradients (set trainer.gradient_clip_val), fp16 overflow "
    "(use trainer.precision=bf16-mixed), or non-finite inputs"
)


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf; the run stops before the state is updated or saved."""


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when every element of every floating-point tensor is finite (one fused norm per dtype)."""
    floats = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    if not floats:
        return True
    norms = torch._foreach_norm(floats)  # a norm is NaN/inf iff some element is (or it overflows)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def logged_terms(trainer: L.Trainer) -> dict[str, float]:
    """The scalar values logged so far in this training step (`train/loss`, `train/l2`, ...)."""
    terms: dict[str, float] = {}
    results = getattr(trainer, "_results", None)  # Lightning's per-step result collection
    for key, metric in results.items() if results is not None else []:
        value = getattr(metric, "value", None)
        if isinstance(value, Tensor) and value.numel() == 1:
            terms[key.split(".", 1)[-1]] = float(value)
    return terms


class FiniteGuard(Callback):
    """Stop (or skip the batch) on non-finite gradients or weights; never save non-finite weights.

    Args:
        policy: "stop" the run, or "skip" isolated bad batches (counted and logged).
        max_consecutive_skips: policy="skip": bad batches in a row that still stop the run.
    """

    def __init__(self, *, policy: Policy = "stop", max_consecutive_skips: int = 3) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not supported; choose one of {POLICIES}")
        self.policy, self.max_consecutive_skips = policy, max_consecutive_skips
        self.skipped = 0
        self._in_a_row = 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if all_finite(p.grad for p in params):
            self._in_a_row = 0
            return
        bad = {k: v for k, v in logged_terms(trainer).items() if not math.isfinite(v)}
        what = f"non-finite loss terms {bad}" if bad else "non-finite gradients with a finite loss"
        where = f"training step {trainer.global_step} (batch {trainer.fit_loop.epoch_loop.batch_idx})"
        self._in_a_row += 1
        if self.policy == "skip" and self._in_a_row <= self.max_consecutive_skips:
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient
            self.skipped += 1
            log.warning("skipped the update of %s: %s (%d skipped so far)", where, what, self.skipped)
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, batch_size=1)
            return
        raise NonFiniteError(f"{what} at {where}; the run stops before updating the weights. {CAUSES}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not all_finite(pl_module.parameters()):
            raise NonFiniteError(
                f"weights became non-finite in the optimizer step of training step "
                f"{trainer.global_step - 1} although its gradients were finite. {CAUSES}"
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not all_finite(checkpoint.get("state_dict", {}).values()):
            raise NonFiniteError(
                f"refusing to save a checkpoint with non-finite weights at step {trainer.global_step}; "
                f"the last checkpoint written stays the last finite one. {CAUSES}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
