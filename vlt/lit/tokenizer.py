"""Stage 1 system: the 1D tokenizer with learnable global merging (or a baseline), trained end to end.

Letters: B batch, N slots, K merged tokens, C channels.

A thin LightningModule: the networks are pure torch (`vlt.models`), the loss is `vlt.objectives`;
this file only samples K, wires the step and logs. `stage()` hands over the inference object
(`vlt.stages.VariableLengthTokenizer`: the network and a frozen snapshot of the learned pattern), and
`vlt.load(checkpoint)` builds the same object from a checkpoint without Lightning.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlt.models.merging import Merger, MergeResult
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import Tokenizer, TokenizerConfig
from vlt.nn.compile import compile_blocks
from vlt.nn.vit import Block
from vlt.objectives.adversarial import AdversarialLoss
from vlt.objectives.recon import ReconLoss, psnr
from vlt.specs import LossSpec, MergeSpec, OptimSpec, param_groups
from vlt.stages.dinov2 import init_encoder
from vlt.stages.tokenizer import VariableLengthTokenizer
from vlt.types import ImageBatch


class LitTokenizer(L.LightningModule):
    """Tokenizer + merger + reconstruction loss.

    Args:
        tokenizer: the network's config (`vlt.models.TokenizerConfig`).
        merge: merge mode, K grid and K policy (`MergeSpec`).
        loss: loss weights (`LossSpec`).
        optim: optimizer and schedule (`OptimSpec`).
        val_ks: the K values evaluated in validation (default: the grid plus N).
        compile: torch.compile each encoder and decoder block (`vlt.nn.compile`; for GPUs: the first
            steps wait for the compiler).
        encoder_init: a local DINOv2 checkpoint the encoder starts from (`vlt.stages.dinov2`), read at
            construction; not a hyper-parameter: a checkpoint of the run loads without the file.

    With `loss.adversarial` > 0 a DINO-feature discriminator trains beside the tokenizer
    (`vlt.objectives.adversarial`). One optimizer holds both networks (AdamW keeps its statistics per
    parameter, so this is two optimizers of the same settings that step together) and each network's
    gradients are clipped apart; global_step, max_steps, the schedule, EMA and resume work as without it.
    Its terms are logged as train/adv_g, train/adv_weight and train/disc_* (train/loss is the tokenizer's
    loss, the adversarial term included).
    """

    def __init__(
        self,
        *,
        tokenizer: TokenizerConfig = TokenizerConfig(),  # noqa: B008 (config values, never mutated)
        merge: MergeSpec = MergeSpec(),  # noqa: B008
        loss: LossSpec = LossSpec(),  # noqa: B008
        optim: OptimSpec = OptimSpec(),  # noqa: B008
        val_ks: list[int] | None = None,
        compile: bool = False,
        encoder_init: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {"tokenizer": tokenizer, "merge": merge, "loss": loss, "optim": optim, "val_ks": val_ks}
            | {"compile": compile}
        )
        self.tokenizer = Tokenizer(tokenizer)
        self.merger = Merger(n_slots=tokenizer.n_slots, channels=tokenizer.channels, **merge.merger_kwargs())
        self.criterion = ReconLoss(**loss.recon_kwargs())
        self.adversarial = AdversarialLoss(**loss.adversarial_kwargs()) if loss.adversarial else None
        if encoder_init is not None:
            init_encoder(self.tokenizer, encoder_init)
        self.optim_spec, self.full_k_fraction = optim, merge.full_k_fraction
        self.val_ks = sorted(set(val_ks or [*self.merger.grid, tokenizer.n_slots]))
        self.val_psnr = nn.ModuleDict({str(k): MeanMetric() for k in self.val_ks})
        self.val_merged_cos = nn.ModuleDict({str(k): MeanMetric() for k in self.val_ks})
        self.val_slot_cos = MeanMetric()
        self.val_mse = MeanMetric()
        self.last_summary: dict[str, float] = {}

    @property
    def n_slots(self) -> int:
        return self.tokenizer.cfg.n_slots

    # --- the inference contract (the same methods as vlt.stages.VariableLengthTokenizer) ---
    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> full latents z (B, N, C)."""
        return self.tokenizer.encode(images).z

    def tokenize(self, images: Tensor, k: int) -> MergeResult:
        """images -> K merged tokens (B, K, C) with their sizes, and the unmerged view."""
        return self.merger(self.encode(images), k)

    def reconstruct(self, images: Tensor, k: int) -> Tensor:
        return self.tokenizer.decode(self.tokenize(images, k).z_hat)

    def pattern(self) -> MergePattern | None:
        """The current global pattern over the grid (None for per-image ToMe merging)."""
        return self.merger.pattern()

    def stage(self) -> VariableLengthTokenizer:
        """A frozen inference copy: the network and a snapshot of the current pattern."""
        cfg = self.tokenizer.cfg
        stage = VariableLengthTokenizer(cfg, self.pattern(), fill=self.merger.fill())
        stage.net.load_state_dict(copy.deepcopy(self.tokenizer.state_dict()))
        return stage.eval().requires_grad_(False)

    # --- training ---
    def training_k(self, step: int, total_steps: int) -> int:
        """K = N for the first `full_k_fraction` of `total_steps` (<= 0: no warm phase), then a draw
        from the weighted grid."""
        if total_steps > 0 and step < self.full_k_fraction * total_steps:
            return self.n_slots
        return self.merger.sample_k()

    def losses(self, images: Tensor, k: int) -> dict[str, Tensor]:
        """Every loss term of one training step at level K (the merger in its current mode); with the
        discriminator also its terms (`vlt.objectives.adversarial`), the generator's inside "loss"."""
        enc = self.tokenizer.encode(images)
        merged = self.merger(enc.z, k)
        recon = self.tokenizer.decode(merged.z_hat)
        # The alignment loss only shapes which slots merge: nothing merges on K = N steps.
        if k < self.n_slots:
            align = self.merger.alignment_loss(enc.z)
        else:  # zero, but every merger parameter stays in the graph: DDP's reducer expects them all
            align = sum((p.sum() for p in self.merger.parameters()), enc.z.new_zeros(())) * 0.0
        parts = self.criterion(images, recon, kl=enc.kl, align=align)
        if self.adversarial is None:
            return parts
        adv = self.adversarial(
            images, recon, parts["loss"], step=self.global_step, last_layer=self.last_layer()
        )
        return parts | adv | {"loss": parts["loss"] + adv["adv_g"]}

    def last_layer(self) -> Tensor:
        """The decoder's last weight (the adaptive GAN weight balances gradients there)."""
        refine = self.tokenizer.refine
        return self.tokenizer.to_pixels.weight if refine is None else refine.out.weight

    def training_step(self, batch: ImageBatch, batch_idx: int) -> Tensor:
        k = self.training_k(self.global_step, self.trainer.max_steps)
        parts = self.losses(batch.image, k)
        self.log_dict({f"train/{name}": value for name, value in parts.items()}, prog_bar=False)
        self.log("train/k", float(k))
        if self.adversarial is None:
            return parts["loss"]
        # One backward for both networks: neither term reaches the other's (vlt.objectives.adversarial).
        return parts["loss"] + parts["disc_loss"]

    def configure_model(self) -> None:
        """With `compile`, compile the encoder and decoder blocks in place."""
        if self.hparams.compile:
            compile_blocks(self.tokenizer, (Block,))

    def configure_optimizers(self) -> dict:
        groups = param_groups(self, self.optim_spec.weight_decay)
        return self.optim_spec.build(groups, self.trainer.max_steps)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """Lightning's clipping; with the discriminator, its heads and the tokenizer clip apart (each to
        the limit, as two optimizers would), so neither network's gradient scales the other's step."""
        if self.adversarial is None or not gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        ids = {id(p) for p in self.adversarial.parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for disc in (False, True):  # the optimizer's order, as Lightning's own clipping has it
            part = [p for p in params if (id(p) in ids) == disc]
            if gradient_clip_algorithm == "value":
                nn.utils.clip_grad_value_(part, gradient_clip_val)
            else:
                nn.utils.clip_grad_norm_(part, gradient_clip_val)

    # --- validation: PSNR at every K, slot collapse and merged-pair diagnostics ---
    def validation_step(self, batch: ImageBatch, batch_idx: int) -> None:
        images = batch.image
        z = self.encode(images)  # (B, N, C)
        cos = _pairwise_cos(z)  # (B, N, N)
        off_diag = ~torch.eye(self.n_slots, dtype=torch.bool, device=z.device)
        self.val_slot_cos.update(cos[:, off_diag].mean(1))
        for k in self.val_ks:
            merged = self.merger(z, k)
            recon = self.tokenizer.decode(merged.z_hat)
            self.val_psnr[str(k)].update(psnr(images, recon))
            same = _same_cluster(self.merger, z, k) & off_diag
            if same.any():
                self.val_merged_cos[str(k)].update(cos[:, same].mean(1) if same.ndim == 2 else cos[same])
        # A metric, not sync_dist: validation batch counts may differ between ranks (exactly-once split).
        self.val_mse.update(F.mse_loss(self.reconstruct(images, self.n_slots), images))

    def on_validation_epoch_end(self) -> None:
        summary = {"loss": self.val_mse.compute().item(), "slot_cos": self.val_slot_cos.compute().item()}
        self.val_slot_cos.reset()
        self.val_mse.reset()
        for k in self.val_ks:
            summary[f"psnr@k{k}"] = self.val_psnr[str(k)].compute().item()
            self.val_psnr[str(k)].reset()
            # The condition must be the same on every rank: compute() is a collective under DDP.
            if k < self.n_slots and self.merger.mode != "nested":
                summary[f"merged_cos@k{k}"] = self.val_merged_cos[str(k)].compute().item()
            self.val_merged_cos[str(k)].reset()
        self.log_dict({f"val/{name}": value for name, value in summary.items()})
        if not self.trainer.sanity_checking:
            self.last_summary = summary

    # --- checkpoints and the end of fit ---
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Name the stage; the pattern is cut from the checkpoint's own merge embeddings at load."""
        checkpoint["vlt_stage"] = "tokenizer"

    def on_fit_end(self) -> None:
        """Export the final pattern beside the run's checkpoints and print the last validation per K."""
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not self.trainer.is_global_zero or not log_dir:
            return
        run_dir = Path(log_dir)
        pattern = self.pattern()
        if pattern is not None:
            pattern.save(run_dir / "pattern.json")
        print(summary_table(self.last_summary, self.val_ks, self.global_step, run_dir))

    # --- the token-budget protocol (vlt.callbacks.token_budget) ---
    def budget_reconstruct(self, images: Tensor, k: int) -> Tensor:
        return self.reconstruct(images, k)

    def budget_tokens(self, k: int) -> float:
        return float(k)

    def budget_flops(self, k: int, task: str = "reconstruct", cfg_scale: float = 1.0) -> float:
        """Encode + decode FLOPs per image. The decoder always sees N slots (merged tokens are broadcast
        back), so reconstruction cost does not fall with K: K buys storage and generation cost."""
        return float(self.tokenizer.flops("encode") + self.tokenizer.flops("decode"))


def summary_table(summary: dict[str, float], ks: list[int], step: int, run_dir: Path) -> str:
    """The end-of-fit report: PSNR and merged-pair cosine per K, slot cosine, where the run lives."""
    lines = [
        f"\nvalidation at step {step} (run directory: {run_dir})",
        "| K | PSNR dB | merged-pair cos |",
        "|---|---|---|",
    ]
    for k in ks:
        cos = summary.get(f"merged_cos@k{k}")
        psnr_k = summary.get(f"psnr@k{k}", float("nan"))
        lines.append(f"| {k} | {psnr_k:.2f} | {'-' if cos is None else f'{cos:.3f}'} |")
    lines.append(f"all-pair slot cos (collapse if near 1): {summary.get('slot_cos', float('nan')):.3f}")
    return "\n".join(lines)


def _pairwise_cos(z: Tensor) -> Tensor:
    """(B, N, C) -> (B, N, N) cosine similarities between slot latents."""
    zn = F.normalize(z.float(), dim=-1)
    return zn @ zn.transpose(1, 2)


def _same_cluster(merger: Merger, z: Tensor, k: int) -> Tensor:
    """(N, N) or (B, N, N) bool: slots i, j end in the same merged token at K (eval pattern)."""
    n = z.shape[1]
    if k == n or merger.mode == "nested":
        return torch.zeros(n, n, dtype=torch.bool, device=z.device)
    if merger.mode == "tome":
        from vlt.models.baselines import bipartite_assignment

        gamma = bipartite_assignment(z, k)  # (B, N, K)
        return (gamma @ gamma.transpose(1, 2)) > 0.5
    assign = merger.assignment(k).to(z.device)
    return assign[:, None] == assign[None, :]
