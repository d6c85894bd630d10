"""Token-budget evaluation: PSNR, rFID and gFID against tokens and FLOPs per image, for a list of K.

Letters: B batch, C channels, H/W height/width, K merged tokens.

The callback owns the FID feature network (so it never lands in model checkpoints) and works with
any LightningModule that implements `BudgetModule`. All ranks evaluate their share of the first
`num_images` validation images and torchmetrics sums the FID states across ranks; rank zero then
logs per-K scalars, figures and a custom-scalars layout to TensorBoard, and writes the curve as
CSV/JSON under `trainer.log_dir/curves/` (read by `vlt curves`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol, get_args

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vlt.adaptive.allocation import to_distortion
from vlt.callbacks.adaptive_budget import (
    check_budgets,
    generation_rows,
    reconstruction_rows,
)
from vlt.callbacks.budget_data import collect_images
from vlt.callbacks.curves import by_mode, metric_columns, plot_curves, write_curve
from vlt.metrics.fid import EXTRACTORS, Extractor, build_fid, metric_name
from vlt.metrics.rate import psnr
from vlt.metrics.real_stats import RealStats, RealStatsKey

Metric = Literal["psnr", "rfid", "gfid"]
METRICS: tuple[str, ...] = get_args(Metric)


class BudgetModule(Protocol):
    """What a LightningModule implements to be evaluated at token budgets (the stage modules do).

    A stage implements what its metrics need: reconstruction (psnr, rfid) needs `budget_reconstruct`,
    generation (gfid) needs `budget_generate`; both need `budget_flops` and `budget_tokens`.
    """

    def budget_reconstruct(self, images: Tensor, k: int) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> encode, merge to K tokens, decode -> (B, 3, H, W) in [-1, 1]."""
        ...

    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float, generator: torch.Generator) -> Tensor:
        """labels (B,) -> sample K tokens with guidance scale `cfg_scale`, decode -> (B, 3, H, W)."""
        ...

    def budget_flops(self, k: int, task: Literal["reconstruct", "generate"], cfg_scale: float) -> float:
        """Forward FLOPs per image of `task` at K (all sampling steps and guidance passes included)."""
        ...

    def budget_tokens(self, k: int) -> float:
        """Tokens per image at K: K itself for a fixed K, the mean over images in adaptive mode."""
        ...


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (on the device the process group reduces)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _all_max(value: float, device: torch.device) -> float:
    """Max of a float over ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class TokenBudgetCallback(pl.Callback):
    """Evaluate PSNR / rFID / gFID, tokens and FLOPs per image at every K in `ks`.

    Args:
        ks: token counts K to evaluate.
        every_n_epochs: evaluate after every n-th training epoch (None: never by epoch).
        every_n_steps: evaluate every n optimizer steps (None: never by step).
        at_fit_end: evaluate when fitting ends (unless that step was just evaluated); also runs
            under `trainer.validate`.
        num_images: images taken from the start of the val dataloader (split over ranks).
        batch_size: fixed evaluation batch size (val batches are re-cut to it).
        metrics: subset of psnr, rfid (reconstruction) and gfid (generation).
        cfg_scales: guidance scales for gfid; several scales give `@k{K}_w{scale}` names.
        extractor: "inception" (needs weights + torch-fidelity) or "proxy" (logged as *_proxy).
        weights: Inception weights file; None looks in the torch hub cache.
        cache_dir: where real statistics are cached (shared across runs).
        dataset_id: names the val set in the cache key; change it when the val data changes.
        resolution: image side for the cache key when the val loader has no images (latents):
            gfid then needs real statistics cached by an image run with the same dataset_id.
        seed: seed of the generation noise (per rank), the same at every evaluation.
        budgets: mean token budgets evaluated in content-adaptive mode (per-image K, see
            `vlt.callbacks.adaptive_budget`); rows get mode "adaptive" (equal mean K) or
            "adaptive-k2" (equal mean K^2, the attention cost of a fixed K = budget).
        budget_costs: which equalities the reconstruction budgets use: "k", "k2" or both.
        budget_distortion: what the reconstruction allocation optimises: "mse" (the set's mean squared
            error; busy images get the tokens) or "neg_psnr" (mean per-image PSNR in dB).
        at_fit_start: also evaluate before the first training step (a "before" curve).
    """

    def __init__(
        self,
        *,
        ks: list[int],
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_fit_end: bool = True,
        num_images: int = 256,
        batch_size: int = 32,
        metrics: list[Metric] | None = None,
        cfg_scales: list[float] | None = None,
        extractor: Extractor = "proxy",
        weights: str | None = None,
        cache_dir: str = "runs/.fid_cache",
        dataset_id: str = "val",
        resolution: int | None = None,
        seed: int = 0,
        budgets: list[float] | None = None,
        budget_costs: list[str] | None = None,
        budget_distortion: str = "mse",
        at_fit_start: bool = False,
    ) -> None:
        super().__init__()
        metrics = ["psnr", "rfid"] if metrics is None else list(metrics)
        for name in metrics:
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r}; expected a subset of {METRICS}")
        if extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {extractor!r}; expected one of {EXTRACTORS}")
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be a non-empty list of positive token counts, got {ks}")
        if num_images < 2 or batch_size < 1:
            raise ValueError("num_images must be >= 2 and batch_size >= 1")
        self.ks = sorted(set(ks))
        self.budgets = sorted(set(budgets or []))
        self.budget_costs = ["k", "k2"] if budget_costs is None else list(budget_costs)
        check_budgets(self.budgets, self.budget_costs, self.ks)
        to_distortion(0.0, budget_distortion)  # validates the name
        self.budget_distortion = budget_distortion
        self.at_fit_start = at_fit_start
        self.every_n_epochs, self.every_n_steps, self.at_fit_end = every_n_epochs, every_n_steps, at_fit_end
        self.num_images, self.batch_size = num_images, batch_size
        self.metrics = metrics
        self.cfg_scales = [1.0] if cfg_scales is None else list(cfg_scales)
        self.extractor, self.weights = extractor, weights
        self.cache = RealStats(cache_dir=cache_dir)
        self.dataset_id, self.resolution, self.seed = dataset_id, resolution, seed
        self.fid = None  # built on first use, on the module's device; never in a checkpoint
        self._real_key: RealStatsKey | None = None
        self._last_step = -1
        self._warned = False

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        needs = {"psnr": "budget_reconstruct", "rfid": "budget_reconstruct", "gfid": "budget_generate"}
        required = {needs[m] for m in self.metrics} | {"budget_flops", "budget_tokens"}
        if self.budgets and "gfid" in self.metrics:
            required.add("budget_generate_adaptive")  # adaptive generation rows
        missing = sorted(name for name in required if not callable(getattr(pl_module, name, None)))
        if missing:
            raise ValueError(
                f"{type(pl_module).__name__} lacks {missing} needed by TokenBudgetCallback(metrics="
                f"{self.metrics}); see vlt.callbacks.token_budget.BudgetModule"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in self._tensorboards(trainer):
                logger.experiment.add_custom_scalars(self.layout())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, force=True)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, force: bool = False) -> list:
        """Measure every K (all ranks), then log and write the curve (rank zero). Returns the rows."""
        if trainer.sanity_checking or (trainer.global_step == self._last_step and not force):
            return []
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                rows, scalars = self.measure(trainer, pl_module)
        finally:
            pl_module.train(was_training)
        self.publish(trainer, rows, scalars)
        return rows

    def measure(self, trainer: pl.Trainer, pl_module: Any) -> tuple[list[dict], dict[str, float]]:
        rank, world = _world()
        device = pl_module.device
        images, labels = collect_images(trainer, self.num_images // world, self.batch_size)
        fid = self._prepare_fid(images, labels, device) if {"rfid", "gfid"} & set(self.metrics) else None
        rows, scalars = [], {}
        base = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        self._curves: dict[int, Tensor] = {}  # K -> this rank's per-image PSNR (B,)
        for k in self.ks:
            row: dict[str, Any] = {**base, "k": k, "mode": "fixed"}
            row["tokens"] = float(pl_module.budget_tokens(k))
            values: dict[str, float] = {}  # column -> value
            if {"psnr", "rfid"} & set(self.metrics):
                values.update(self._reconstruct(trainer, pl_module, fid, images, k))
                row["flops"] = float(pl_module.budget_flops(k, "reconstruct", 1.0))
            if "gfid" in self.metrics:
                for scale in self.cfg_scales:
                    column = metric_name("gfid", self.extractor)
                    column += f"_w{scale:g}" if len(self.cfg_scales) > 1 else ""
                    generator = torch.Generator(device).manual_seed(self.seed + 1000 * rank)
                    values[column] = self._generate(trainer, pl_module, fid, labels, k, scale, generator)
                    row[f"flops_{column}"] = float(pl_module.budget_flops(k, "generate", scale))
                    row.setdefault("flops", row[f"flops_{column}"])
            row.update(values)
            rows.append(row)
            scalars.update(self._scalar_names(row, values))
        if self.budgets and {"psnr", "rfid"} & set(self.metrics):
            curves = torch.stack([self._curves[k] for k in self.ks], dim=1)  # (B, G)
            extra = reconstruction_rows(self, trainer, pl_module, fid, images, curves, base)
            rows += extra[0]
            scalars.update(extra[1])
        if self.budgets and "gfid" in self.metrics:
            extra = generation_rows(self, trainer, pl_module, fid, labels, base, rank)
            rows += extra[0]
            scalars.update(extra[1])
        return rows, scalars

    def _prepare_fid(self, images: list[Tensor], labels: list[Tensor], device: torch.device):
        if self.fid is None:
            self.fid = build_fid(self.extractor, self.weights)
        self.fid = self.fid.to(device)
        # A latent loader has labels but no images: its sample count still names the real set size.
        n_local = sum(len(x) for x in images) if images else sum(len(y) for y in labels)
        n_total = int(_all_sum([float(n_local)], self._reduce_device(device))[0])
        # A rank may hold no images (exactly-once validation split): agree on the side over ranks.
        side_local = images[0].shape[-1] if images else (self.resolution or 0)
        side = int(_all_max(float(side_local), self._reduce_device(device))) or None
        if side is None:
            raise ValueError("the val dataloader gives no images: set TokenBudgetCallback(resolution=...)")
        key = RealStatsKey(self.dataset_id, self.fid.inception.name, int(side), n_total)
        if key != self._real_key:  # reused across validations while the key holds
            any_images = _all_max(1.0 if images else 0.0, self._reduce_device(device)) > 0
            if not any_images and not self.cache.exists(key):
                raise ValueError(
                    "no real images in the val dataloader and no cached statistics at "
                    f"{self.cache.path(key)}: run an image evaluation with the same dataset_id and "
                    "cache_dir first"
                )
            self.cache.prepare(self.fid, key, images)
            self._real_key = key
        return self.fid

    def _reconstruct(self, trainer, pl_module, fid, images: list[Tensor], k: int) -> dict[str, float]:
        if fid is not None:
            fid.reset()  # the real side stays (reset_real_features=False)
        total, count, per_image = 0.0, 0, []
        for x in images:
            x = x.to(pl_module.device)  # (B, 3, H, W)
            with trainer.precision_plugin.forward_context():
                y = pl_module.budget_reconstruct(x, k)
            y = y.float().clamp(-1, 1)  # (B, 3, H, W)
            per_image.append(psnr(y, x).double().cpu())  # (B,)
            total += float(per_image[-1].sum())
            count += len(x)
            if fid is not None and "rfid" in self.metrics:
                fid.update(y, real=False)
        self._curves[k] = torch.cat(per_image) if per_image else torch.zeros(0, dtype=torch.float64)
        out = {}
        if "psnr" in self.metrics:
            total, count = _all_sum([total, float(count)], self._reduce_device(pl_module.device))
            out["psnr"] = total / max(count, 1.0)
            # PSNR of the set's mean squared error (the quantity an "mse" allocation maximises).
            err = _all_sum(
                [float(torch.pow(10.0, -self._curves[k] / 10).sum())], self._reduce_device(pl_module.device)
            )
            out["psnr_mse"] = -10 * math.log10(max(err[0] / max(count, 1.0), 1e-10))
        if "rfid" in self.metrics:
            out[metric_name("rfid", self.extractor)] = float(fid.compute())
        return out

    def _generate(self, trainer, pl_module, fid, labels: list[Tensor], k, scale, generator) -> float:
        fid.reset()
        for y in labels:
            with trainer.precision_plugin.forward_context():
                images = pl_module.budget_generate(y.to(pl_module.device), k, scale, generator)
            fid.update(images.float().clamp(-1, 1), real=False)
        return float(fid.compute())

    @staticmethod
    def _reduce_device(device: torch.device) -> torch.device:
        nccl = _world()[1] > 1 and dist.get_backend() == "nccl"
        return device if nccl else torch.device("cpu")

    @staticmethod
    def _scalar_names(row: Mapping[str, Any], values: Mapping[str, float]) -> dict[str, float]:
        k = row["k"]
        out = {f"budget/tokens@k{k}": row["tokens"], f"budget/tflops@k{k}": row["flops"] / 1e12}
        for column, value in values.items():
            base, _, scale = column.partition("_w")
            suffix = f"_w{scale}" if scale else ""
            out[f"budget/{base}@k{k}{suffix}"] = value
            if f"flops_{column}" in row:
                out[f"budget/gen_tflops@k{k}{suffix}"] = row[f"flops_{column}"] / 1e12
        return out

    # ------------------------------------------------------------ publishing
    def layout(self) -> dict:
        """TensorBoard custom-scalars layout: one multiline chart per series over all K."""
        bases = [m if m == "psnr" else metric_name(m, self.extractor) for m in self.metrics]
        bases += ["tokens", "tflops"] + (["gen_tflops"] if "gfid" in self.metrics else [])
        charts = {base: ["Multiline", [rf"budget/{base}@k\d+.*"]] for base in bases}
        if self.budgets:
            charts.update(
                {f"{base} adaptive": ["Multiline", [rf"budget/{base}@adaptive.*"]] for base in bases}
            )
        return {"token budget": charts}

    def publish(self, trainer: pl.Trainer, rows: list[dict], scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        meta = {"step": trainer.global_step, "epoch": trainer.current_epoch, "extractor": self.extractor}
        write_curve(log_dir or trainer.default_root_dir, rows, meta)
        columns = metric_columns(rows)
        tensorboards = self._tensorboards(trainer)
        if not tensorboards and not self._warned:
            rank_zero_warn("TokenBudgetCallback: no TensorBoard logger; figures skipped, curve files written")
            self._warned = True
        for logger in tensorboards:
            for x in ("tokens", "flops"):
                figure = plot_curves(by_mode(rows, f"step {trainer.global_step}"), columns, x=x)
                logger.experiment.add_figure(f"budget/curve_vs_{x}", figure, trainer.global_step)
            logger.experiment.flush()

    def _tensorboards(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
