"""Stage 3 system: joint end-to-end fine-tune of the tokenizer and the DiT on images (REPA-E style).

Letters: B batch, N slots, K merged tokens, C channels, D DiT width, F alignment feature width.

Back-propagating the diffusion loss into the tokenizer collapses the latent (REPA-E), so each step
combines three losses with three different gradient paths:
  - diffusion: the DiT learns the flow on merged latents of the LIVE tokenizer, built from z.detach()
    (stop-gradient for the tokenizer);
  - alignment (REPA): DiT hidden tokens after block `align_depth`, projected to width F, against the
    frozen encoder's features merged with the same Gbar_K. It runs twice on one noise draw: on the
    detached x_t to train the DiT and the projector, and on the live x_t with the DiT and projector
    parameters out of autograd (`frozen_params`), so only the tokenizer learns from that pass;
  - reconstruction: the tokenizer's own L2 + KL at a K drawn from its grid.
Latents are normalised BatchNorm-style: batch statistics (treated as constants) in training, running
statistics updated with momentum, used in eval and exported as the DiT's latent_mean/std. The merge
embeddings are frozen: the global pattern is the contract between the stages, so the tokenizer's
table and the DiT's assign buffers stay identical (`check_contract`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlt.lit.dit import FlowSpec, PatternBuffers
from vlt.lit.joint_io import export_stages, init_weights, read_hparams
from vlt.lit.specs import LossSpec, MergeSpec, OptimSpec, allow_in_checkpoints, param_groups
from vlt.metrics.rate import transformer_flops
from vlt.models.align import FileFeatures, Projector, SlotFeatures, alignment_loss, frozen_params
from vlt.models.dit import DiT, DiTConfig
from vlt.models.merge_ops import column_normalise, merge, one_hot, unmerge
from vlt.models.merging import Merger
from vlt.models.tokenizer import Tokenizer, TokenizerConfig
from vlt.objectives.flow import RectifiedFlow
from vlt.objectives.recon import ReconLoss, psnr

ENCODER_KINDS: tuple[str, ...] = ("stage1", "file")


@dataclass
class JointSpec:
    """Loss weights and knobs of the joint step.

    Args:
        diffusion, align, recon: loss weights (REPA-E uses 1.0 / 0.5 / 1.0).
        align_depth: DiT block whose output is aligned (None: max(1, depth // 2)).
        projector_hidden: hidden width of the projector MLP.
        bn_momentum: momentum of the running latent statistics (BatchNorm's convention).
    """

    diffusion: float = 1.0
    align: float = 0.5
    recon: float = 1.0
    align_depth: int | None = None
    projector_hidden: int = 2048
    bn_momentum: float = 0.1


@dataclass
class PartLR:
    """Peak learning rate per part; None takes `optim.lr`. All follow `optim`'s schedule."""

    tokenizer: float | None = None
    dit: float | None = None
    projector: float | None = None


@dataclass
class AlignEncoderSpec:
    """The frozen alignment target. kind "stage1": a frozen copy of the initial stage-1 encoder
    (`features` hidden or latent); kind "file": a `torch.jit` encoder at `path` (see FileFeatures)."""

    kind: Literal["stage1", "file"] = "stage1"
    features: Literal["hidden", "latent"] = "hidden"
    path: str | None = None
    image_size: int | None = None


allow_in_checkpoints(JointSpec, PartLR, AlignEncoderSpec, TokenizerConfig, DiTConfig, FlowSpec)


class LitJoint(PatternBuffers, L.LightningModule):
    """Tokenizer + frozen merger + DiT + projector, fine-tuned together on image batches.

    Args:
        init_from_tokenizer, init_from_dit: stage-1 / stage-2 checkpoints loaded at the start of a new
            fit (not when resuming with --ckpt_path, whose weights win); their configs fill any of
            tokenizer, merge, loss, dit, ks, k_cycle, flow left None and are saved in hparams.
        ks: the K values the DiT serves; k_cycle: one K per step, cycled.
        joint, part_lr, align_encoder, optim: see the dataclasses.
    """

    def __init__(
        self,
        *,
        init_from_tokenizer: str | None = None,
        init_from_dit: str | None = None,
        tokenizer: TokenizerConfig | None = None,
        merge: MergeSpec | None = None,
        loss: LossSpec | None = None,
        dit: DiTConfig | None = None,
        ks: list[int] | None = None,
        k_cycle: list[int] | None = None,
        flow: FlowSpec | None = None,
        joint: JointSpec | None = None,
        part_lr: PartLR | None = None,
        align_encoder: AlignEncoderSpec | None = None,
        optim: OptimSpec | None = None,
    ) -> None:
        super().__init__()
        tok_h = read_hparams(init_from_tokenizer) if None in (tokenizer, merge, loss) else {}
        dit_h = read_hparams(init_from_dit) if None in (dit, ks, flow) else {}
        tokenizer = tokenizer or tok_h.get("tokenizer") or TokenizerConfig()
        merge, loss = merge or tok_h.get("merge") or MergeSpec(), loss or tok_h.get("loss") or LossSpec()
        dit, flow = dit or dit_h.get("dit") or DiTConfig(), flow or dit_h.get("flow") or FlowSpec()
        ks = sorted(ks or dit_h.get("ks") or merge.grid)
        k_cycle = k_cycle or dit_h.get("k_cycle") or ks
        joint, part_lr = joint or JointSpec(), part_lr or PartLR()
        align_encoder, optim = align_encoder or AlignEncoderSpec(), optim or OptimSpec(lr=1e-4)
        if align_encoder.kind not in ENCODER_KINDS:
            raise ValueError(
                f"unknown align_encoder.kind {align_encoder.kind!r}; choose one of {ENCODER_KINDS}"
            )
        if (tokenizer.n_slots, tokenizer.channels) != (dit.n_slots, dit.channels):
            raise ValueError(
                f"tokenizer latents are {tokenizer.n_slots}x{tokenizer.channels} but the DiT expects "
                f"N={dit.n_slots}, C={dit.channels}"
            )
        hparams = dict(
            init_from_tokenizer=init_from_tokenizer, init_from_dit=init_from_dit, tokenizer=tokenizer,
            merge=merge, loss=loss, dit=dit, ks=ks, k_cycle=k_cycle, flow=flow, joint=joint,
            part_lr=part_lr, align_encoder=align_encoder, optim=optim,
        )  # fmt: skip
        self.save_hyperparameters(hparams)
        self.tokenizer = Tokenizer(tokenizer)
        self.merger = Merger(n_slots=tokenizer.n_slots, channels=tokenizer.channels, **merge.merger_kwargs())
        self.merger.requires_grad_(False)  # the pattern is the contract with the DiT: frozen
        self.dit = DiT(dit)
        self.criterion = ReconLoss(**{**vars(loss), "align": 0.0})
        self.flow = RectifiedFlow(t_mean=flow.t_mean, t_std=flow.t_std)
        self.ks, self.k_cycle, self.spec, self.part_lr, self.optim_spec = ks, k_cycle, joint, part_lr, optim
        self.flow_spec = flow
        self.align_depth = joint.align_depth or max(1, dit.depth // 2)
        if align_encoder.kind == "stage1":
            self.target = SlotFeatures(tokenizer, features=align_encoder.features)
        else:
            self.target = FileFeatures(
                str(align_encoder.path), n_slots=tokenizer.n_slots,
                image_size=align_encoder.image_size, probe_size=tokenizer.image_size,
            )  # fmt: skip
        self.projector = Projector(width=dit.width, hidden=joint.projector_hidden, out=self.target.width)
        self.register_pattern(dit.n_slots, ks)  # placeholders until stage-2 (or joint) weights load
        self.register_buffer("latent_mean", torch.zeros(dit.channels))
        self.register_buffer("latent_var", torch.ones(dit.channels))
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
        self.val_loss = nn.ModuleDict({str(k): MeanMetric() for k in ks})
        self.val_psnr = nn.ModuleDict({str(k): MeanMetric() for k in ks})

    # --- the pattern contract and the latent normalisation ---
    def check_contract(self) -> None:
        """The frozen merger's eval pattern must equal the DiT's assign buffers at every shared K."""
        for k in self.ks:
            if k in self.merger.grid and not torch.equal(
                self.merger.assignment(k).cpu(), getattr(self, f"assign_{k}").cpu()
            ):
                raise ValueError(
                    f"merge pattern mismatch at K={k} between the tokenizer and the DiT: the stage-2 "
                    "checkpoint was trained on another tokenizer's latents"
                )

    @property
    def latent_std(self) -> Tensor:
        return (self.latent_var + 1e-6).sqrt()

    def normalise(self, z: Tensor) -> Tensor:
        """(B, N, C) -> per-channel standardised; training uses (and tracks) batch statistics.

        The statistics are per rank under DDP (BatchNorm without sync): each rank's batch is large
        (B x N latents per channel) and the checkpoint keeps rank zero's running values."""
        if not self.training:
            return (z - self.latent_mean) / self.latent_std
        zd = z.detach().float()
        mean, var = zd.mean((0, 1)), zd.var((0, 1), unbiased=False)  # (C,)
        with torch.no_grad():
            m = self.spec.bn_momentum
            self.latent_mean.lerp_(mean, m)
            self.latent_var.lerp_(zd.var((0, 1), unbiased=True), m)
        return (z - mean.to(z)) / (var.to(z) + 1e-6).sqrt()

    def labels(self, y: Tensor) -> Tensor:
        """Unlabelled samples (-1) train the unconditional branch."""
        return torch.where(y < 0, torch.full_like(y, self.dit.null_label), y)

    # --- training ---
    def training_k(self) -> int:
        return self.k_cycle[self.global_step % len(self.k_cycle)]

    def losses(self, batch: dict, k: int, recon_k: int) -> dict[str, Tensor]:
        """Every loss term of one step at DiT level K and reconstruction level recon_k."""
        images, y = batch["image"], self.labels(batch["label"])
        enc = self.tokenizer.encode(images)  # z: (B, N, C)
        recon = self.criterion(images, self.decode_at(enc.z, recon_k), kl=enc.kl, align=enc.kl.new_zeros(()))
        gbar, sizes = self.pattern(k)
        path = self.flow.noisy(merge(self.normalise(enc.z), gbar), gbar)  # x_t: (B, K, C), live
        drop = None  # one label-dropout draw shared by both DiT passes
        if self.training and self.dit.cfg.class_dropout > 0:
            drop = (torch.rand(y.shape[0], device=y.device) < self.dit.cfg.class_dropout).long()
        target = merge(self.target(images), gbar)  # (B, K, F)
        kw = {"depth": self.align_depth, "force_drop_ids": drop}
        out = self.dit.forward_hidden(path.x_t.detach(), path.t, y, gbar, sizes, **kw)
        diffusion = self.flow.velocity_loss(out.velocity, path.target.detach(), sizes)
        align_dit = alignment_loss(self.projector(out.hidden), target)  # trains DiT + projector
        with frozen_params(self.dit, self.projector):
            hidden = self.dit.hidden_states(path.x_t, path.t, y, gbar, sizes, **kw)  # (B, K, D)
            align_tok = alignment_loss(self.projector(hidden), target)  # trains the tokenizer only
        s = self.spec
        total = s.diffusion * diffusion["loss"] + s.align * (align_dit + align_tok) + s.recon * recon["loss"]
        return dict(
            loss=total, diffusion=diffusion["loss"], mse=diffusion["mse"], align_dit=align_dit,
            align_tok=align_tok, recon=recon["loss"], l2=recon["l2"], kl=recon["kl"],
        )  # fmt: skip

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        k = self.training_k()
        parts = self.losses(batch, k, recon_k=self.merger.sample_k())
        self.log_dict({f"train/{name}": value for name, value in parts.items()})
        self.log("train/k", float(k))
        return parts["loss"]

    def configure_optimizers(self) -> dict:
        groups = []
        for part, module in (("tokenizer", self.tokenizer), ("dit", self.dit), ("projector", self.projector)):
            lr = getattr(self.part_lr, part) or self.optim_spec.lr
            groups += [
                {**g, "lr": lr} for g in param_groups(module, self.optim_spec.weight_decay) if g["params"]
            ]
        return self.optim_spec.build(groups, self.trainer.max_steps)

    def setup(self, stage: str) -> None:
        """Every fit starts from the stage checkpoints. Lightning restores a `--ckpt_path` after this
        hook, so a resumed run ends with the joint checkpoint's weights (it still reads the init files)."""
        if stage == "fit":
            init_weights(self)

    # --- validation: diffusion loss and PSNR per K ---
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, y = batch["image"], self.labels(batch["label"])
        z = self.tokenizer.encode(images).z  # (B, N, C)
        for k in self.ks:
            gbar, sizes = self.pattern(k)
            path = self.flow.noisy(merge(self.normalise(z), gbar), gbar)
            v = self.dit(path.x_t, path.t, y, gbar, sizes)
            self.val_loss[str(k)].update(self.flow.velocity_loss(v, path.target, sizes)["loss"])
            self.val_psnr[str(k)].update(psnr(images, self.decode_at(z, k)))

    def on_validation_epoch_end(self) -> None:
        for k in self.ks:
            self.log(f"val/loss@k{k}", self.val_loss[str(k)].compute())
            self.log(f"val/psnr@k{k}", self.val_psnr[str(k)].compute())
            self.val_loss[str(k)].reset()
            self.val_psnr[str(k)].reset()

    # --- checkpoints and exports ---
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_contract()
        checkpoint["merge_table"] = self.table().to_dict()

    def on_fit_end(self) -> None:
        """Export the stage checkpoints of the final (EMA, if any) weights into <run_dir>/export/."""
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.trainer.is_global_zero:
            self.export(Path(log_dir or self.trainer.default_root_dir) / "export")

    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write tokenizer.ckpt (LitTokenizer), dit.ckpt (LitDiT) and merge_table.json; returns the paths."""
        self.check_contract()
        return export_stages(self, Path(out_dir))

    # --- decoding, generation and the token-budget protocol ---
    def decode_at(self, z: Tensor, k: int) -> Tensor:
        """z (B, N, C) -> merge to K with the frozen pattern, unmerge, decode -> (B, 3, H, W)."""
        if k == z.shape[1]:
            return self.tokenizer.decode(z)
        gamma = one_hot(self.merger.assignment(k), k).to(z)  # (N, K)
        return self.tokenizer.decode(unmerge(merge(z, column_normalise(gamma)), gamma))

    @torch.no_grad()
    def generate(self, labels: Tensor, k: int, *, cfg_scale: float | None = None, steps: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
        """Sample images (B, 3, H, W) in [-1, 1] at K tokens with the DiT and the live tokenizer."""
        spec, (gbar, sizes) = self.flow_spec, self.pattern(k)
        x = self.flow.sample(
            self.dit, y=labels.to(self.device), gbar=gbar, sizes=sizes, steps=steps or spec.sample_steps,
            method=spec.sampler, cfg_scale=spec.cfg_scale if cfg_scale is None else cfg_scale,
            cfg_interval=spec.cfg_interval, generator=generator,
        )  # fmt: skip
        tokens = x * self.latent_std + self.latent_mean  # (B, K, C)
        z = unmerge(tokens, one_hot(getattr(self, f"assign_{k}"), k))  # (B, N, C)
        return self.tokenizer.decode(z).clamp(-1, 1)

    def budget_reconstruct(self, images: Tensor, k: int) -> Tensor:
        return self.decode_at(self.tokenizer.encode(images).z, k)

    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float, generator=None) -> Tensor:
        return self.generate(labels, k, cfg_scale=cfg_scale, generator=generator)

    def budget_tokens(self, k: int) -> float:
        return float(k)

    def budget_flops(self, k: int, task: str = "reconstruct", cfg_scale: float = 1.0) -> float:
        """Reconstruct: encode + decode. Generate: DiT calls of every sampling step + one decode."""
        if task == "reconstruct":
            return float(self.tokenizer_flops("encode") + self.tokenizer_flops("decode"))
        spec = self.flow_spec
        calls = spec.sample_steps * (2 if spec.sampler == "heun" else 1) * (2 if cfg_scale != 1.0 else 1)
        return float(calls * self.dit.flops(k) + self.tokenizer_flops("decode"))

    def tokenizer_flops(self, part: str) -> int:
        cfg = self.tokenizer.cfg
        depth = {"encode": cfg.enc_depth, "decode": cfg.dec_depth}[part]
        hidden = int(cfg.width * cfg.mlp_ratio)
        return transformer_flops(cfg.n_patches + cfg.n_slots, cfg.width, depth, hidden, gated=False)
