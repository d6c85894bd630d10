"""Training progress on a pipe: one status line per interval instead of Lightning's bar.

Lightning's progress bar redraws one terminal line; written to a file (CI logs, Slurm's slurm-%j.out) it
becomes one very long line. `vlt fit` keeps the bar on a terminal and uses `ProgressLines` elsewhere:

    fit tokenizer-tiny: step 1200/4000 (30%) 4.21 it/s ETA 11m05s elapsed 4m45s loss 0.0123 lr 2.9e-03
"""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from vlt.console import StatusLines, duration


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


class ProgressLines(pl.Callback):
    """A status line every `every` seconds of training (rank zero), and one around each validation.

    Args:
        name: the run's name, at the start of each line.
        every: seconds between lines (default: `VLT_PROGRESS_EVERY`, else 20).
    """

    def __init__(self, name: str = "fit", every: float | None = None) -> None:
        self.name, self.every = name, every
        self._lines: StatusLines | None = None
        self._start_step = 0

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        params = sum(p.numel() for p in pl_module.parameters())
        self._start_step = trainer.global_step
        print(
            f"fit {self.name}: {type(pl_module).__name__}, {params / 1e6:.2f} M parameters, "
            f"from step {trainer.global_step} to {total or 'the end of data'}; run directory "
            f"{trainer.default_root_dir} (`make tensorboard` to watch)",
            flush=True,
        )
        self._lines = StatusLines(
            f"fit {self.name}: step", total, every=self.every, initial=trainer.global_step
        )

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._lines is None:
            return
        self._lines.update(trainer.global_step, self._extra(trainer, outputs))

    def _extra(self, trainer: pl.Trainer, outputs: Any) -> str:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        parts = []
        if (value := _number(loss)) is not None:
            parts.append(f"loss {value:.4g}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        return " ".join(parts)

    @rank_zero_only
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._lines is not None:
            print(f"fit {self.name}: validating at step {trainer.global_step}", flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._lines is None:
            return
        shown = by_k(headline(trainer.callback_metrics, limit=8))
        values = "; ".join(f"{key} {value}" for key, value in shown.items())
        print(f"fit {self.name}: step {trainer.global_step} validation: {values or 'done'}", flush=True)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lines is not None:
            self._lines.update(trainer.global_step, force=True)
            steps = trainer.global_step - self._start_step
            print(f"fit {self.name}: {steps} steps in {duration(self._lines.elapsed)}", flush=True)


class PredictLines(pl.Callback):
    """A status line every `every` seconds of a predict loop (rank zero's batches), for pipes.

    Args:
        name: the command, at the start of each line ("sample: batch 3/40 (8%) ...").
        every: seconds between lines (default: `VLT_PROGRESS_EVERY`, else 20).
    """

    def __init__(self, name: str, every: float | None = None) -> None:
        self.name, self.every = name, every
        self._lines: StatusLines | None = None
        self._done = 0

    @rank_zero_only
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counted = sum(trainer.num_predict_batches)  # inf for a loader without a length (a stream)
        total = int(counted) if math.isfinite(counted) else None
        self._lines, self._done = StatusLines(f"{self.name}: batch", total, every=self.every), 0
        what = f"{total} batches" if total is not None else "batches"
        print(f"{self.name}: {what} to make on rank 0 of {trainer.world_size}", flush=True)

    @rank_zero_only
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._lines is not None:
            self._done += 1
            self._lines.update(self._done)

    @rank_zero_only
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lines is not None and self._lines.last_done != self._done:
            self._lines.update(self._done, force=True)


# Logged names worth a headline: per-K PSNR or loss and the token-budget scores, not tokens/FLOPs/intervals.
_HEADLINE_PREFIXES = ("val/psnr@", "val/loss@", "budget/")
_NOT_HEADLINE = ("budget/tokens", "budget/tflops", "budget/gen_tflops", "_ci", "_lo", "_hi", "@target")


def _natural(key: str) -> tuple:
    """val/ first, then by name with numbers compared as numbers (k4 < k16)."""
    parts = re.split(r"(\d+)", key)
    return (not key.startswith("val/"), [int(p) if p.isdigit() else p for p in parts])


def headline(metrics: dict[str, Any], limit: int = 12) -> dict[str, float]:
    """The logged scalars a person looks at first: PSNR per K, then the budget curve's scores."""
    out: dict[str, float] = {}
    for key in sorted(metrics, key=_natural):
        if not key.startswith(_HEADLINE_PREFIXES) or any(part in key for part in _NOT_HEADLINE):
            continue
        if (value := _number(metrics[key])) is not None:
            out[key] = value
        if len(out) >= limit:
            break
    return out


_PER_K = re.compile(r"^(?P<base>.+)@k(?P<k>\d+)(?P<suffix>.*)$")


def by_k(metrics: dict[str, float]) -> dict[str, str]:
    """Fold per-K scalars into one line per series: {"val/psnr": "K=4: 19.9, 8: 21.2, 32: 22.4"}."""
    series: dict[str, list[tuple[str | None, float]]] = {}
    for key, value in metrics.items():
        match = _PER_K.match(key)
        name, k = (match["base"] + match["suffix"], match["k"]) if match else (key, None)
        series.setdefault(name, []).append((k, value))
    out = {}
    for name, points in series.items():
        text = ", ".join(f"{value:.4g}" if k is None else f"{k}: {value:.4g}" for k, value in points)
        out[name] = f"K={text}" if points[0][0] is not None else text
    return out
