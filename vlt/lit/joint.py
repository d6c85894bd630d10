"""Stage 3 system: joint end-to-end fine-tune of the tokenizer and the DiT on images (REPA-E style).

Letters: B batch, N slots, K merged tokens, C channels, D DiT width, F alignment feature width.

The model is a `LatentGenerator` whose tokenizer trains too. Back-propagating the diffusion loss
into the tokenizer collapses the latent (REPA-E), so each step combines three losses with three
gradient paths:
  - diffusion: the DiT learns the flow on merged latents of the LIVE tokenizer, built from z.detach()
    (stop-gradient for the tokenizer);
  - alignment (REPA): DiT hidden tokens after block `align_depth`, projected to width F, against the
    frozen encoder's features merged with the same pattern. It runs twice on one noise draw: on the
    detached x_t to train the DiT and the projector, and on the live x_t with the DiT and projector
    parameters out of autograd (`frozen_params`), so only the tokenizer learns from that pass;
  - reconstruction: the tokenizer's own L2 + KL at a K drawn from its grid.
Latents are normalised BatchNorm-style: batch statistics (treated as constants) in training, running
statistics updated with momentum into the generator's latent_mean / latent_std, used in eval. The
global pattern is the contract between the stages, so it is frozen: one MergePattern serves the
tokenizer and the DiT. A checkpoint is a generator checkpoint (`vlt.load` samples from it); at the end
of fit the generator and its tokenizer are exported to <run>/export/{generator,tokenizer}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlt.lit.dit import init_args
from vlt.models.align import FileFeatures, Projector, SlotFeatures, alignment_loss, frozen_params
from vlt.models.dit import DiTConfig
from vlt.models.pattern import PatternKind
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec
from vlt.objectives.recon import ReconLoss, psnr
from vlt.specs import AlignEncoderSpec, JointSpec, LossSpec, MergeSpec, OptimSpec, PartLR, param_groups
from vlt.stages import export, load
from vlt.stages.export import build_generator, read_checkpoint
from vlt.types import ImageBatch

ENCODER_KINDS: tuple[str, ...] = ("stage1", "file")


class LitJoint(L.LightningModule):
    """Generator (DiT + trainable tokenizer, frozen pattern) + projector, fine-tuned together on images.

    Args:
        init_from_tokenizer, init_from_dit: stage-1 and stage-2 checkpoints read at the start of a new
            fit (not when resuming with --ckpt_path).
        tokenizer, merge, loss, dit: the stage configs; None (the usual case) takes them from the init
            checkpoints: the CLI and `from_checkpoints` fill them (`resolve_sources`), as they fill ks,
            pattern_kind, k_cycle and flow. Of `loss` only the reconstruction weights apply (a stage-1 run's
            GAN terms are not trained here).
        ks: the K values the DiT serves; k_cycle: one K per step, cycled.
        joint, part_lr, align_encoder, optim: see the dataclasses in `vlt.specs`.
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
        pattern_kind: PatternKind = "contiguous",
        k_cycle: list[int] | None = None,
        flow: FlowSpec = FlowSpec(),  # noqa: B008
        joint: JointSpec = JointSpec(),  # noqa: B008 (config values, never mutated)
        part_lr: PartLR = PartLR(),  # noqa: B008
        align_encoder: AlignEncoderSpec = AlignEncoderSpec(),  # noqa: B008
        optim: OptimSpec = OptimSpec(lr=1e-4),  # noqa: B008
    ) -> None:
        super().__init__()
        self.save_hyperparameters(init_args(locals()))
        if tokenizer is None or dit is None:
            raise ValueError(
                "LitJoint needs the tokenizer and DiT configs: name init_from_tokenizer/init_from_dit and "
                "build it with the CLI or LitJoint.from_checkpoints (which read them), or pass them"
            )
        merge, loss = merge or MergeSpec(grid=ks or [dit.n_slots]), loss or LossSpec()
        if align_encoder.kind not in ENCODER_KINDS:
            raise ValueError(
                f"unknown align_encoder.kind {align_encoder.kind!r}; choose one of {ENCODER_KINDS}"
            )
        ks = self.hparams.ks = sorted(ks or merge.grid)
        self.generator = build_generator(
            dit, {"n": dit.n_slots, "ks": ks, "kind": pattern_kind}, flow=flow, tokenizer=tokenizer
        )
        self.generator.tokenizer.requires_grad_(True)  # the generator freezes it; stage 3 trains it
        self.ks, self.k_cycle, self.spec = ks, k_cycle or ks, joint
        self.recon_grid = [k for k in merge.grid if k in ks] or ks
        # The reconstruction terms only: stage 1's GAN terms (loss.adversarial, ...) are not trained here.
        self.criterion = ReconLoss(**{**loss.recon_kwargs(), "align": 0.0})
        self.align_depth = joint.align_depth or max(1, dit.depth // 2)
        if align_encoder.kind == "stage1":
            self.target = SlotFeatures(tokenizer, features=align_encoder.features)
        else:
            self.target = FileFeatures(
                str(align_encoder.path), n_slots=tokenizer.n_slots,
                image_size=align_encoder.image_size, probe_size=tokenizer.image_size,
            )  # fmt: skip
        self.projector = Projector(width=dit.width, hidden=joint.projector_hidden, out=self.target.width)
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
        self.val_loss = nn.ModuleDict({str(k): MeanMetric() for k in ks})
        self.val_psnr = nn.ModuleDict({str(k): MeanMetric() for k in ks})

    # --- building from the stage checkpoints ---
    @classmethod
    def resolve_sources(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Fill the arguments left None from the hyper-parameters of the init checkpoints."""
        args = {key: value for key, value in args.items() if value is not None}
        if args.get("init_from_tokenizer"):
            hp = read_checkpoint(args["init_from_tokenizer"])["hyper_parameters"]
            for key in ("tokenizer", "merge", "loss"):
                args.setdefault(key, hp[key])
        if args.get("init_from_dit"):
            hp = read_checkpoint(args["init_from_dit"])["hyper_parameters"]
            args.setdefault("tokenizer", hp["tokenizer_config"])
            for key in ("dit", "ks", "pattern_kind", "k_cycle", "flow"):
                if hp.get(key) is not None:
                    args.setdefault(key, hp[key])
        return args

    @classmethod
    def from_checkpoints(cls, init_from_tokenizer: str | None, init_from_dit: str, **kwargs: Any) -> LitJoint:
        """A model shaped by and initialised from the stage checkpoints."""
        args = {"init_from_tokenizer": init_from_tokenizer, "init_from_dit": init_from_dit, **kwargs}
        model = cls(**cls.resolve_sources(args))
        model.load_sources()
        return model

    @torch.no_grad()
    def load_sources(self) -> None:
        """Weights from the stage checkpoints; the frozen alignment target copies the stage-1 encoder."""
        hp, gen = self.hparams, self.generator
        if hp.init_from_dit:
            gen.load_state_dict(load(hp.init_from_dit, part="generator").state_dict())
        if hp.init_from_tokenizer:
            source = (
                f"{hp.init_from_tokenizer} (was {hp.init_from_dit} trained on another tokenizer's latents?)"
            )
            gen.take_tokenizer(load(hp.init_from_tokenizer, part="tokenizer"), source=source)
        if isinstance(self.target, SlotFeatures):
            self.target.copy_from(gen.tokenizer.net)

    def setup(self, stage: str) -> None:
        """A new fit reads its stage checkpoints; a resumed one restores everything after this hook."""
        if stage == "fit" and not self.trainer.ckpt_path:
            self.load_sources()

    # --- the latent normalisation ---
    def normalise(self, z: Tensor) -> Tensor:
        """(B, N, C) -> per-channel standardised; training uses (and tracks) batch statistics.

        The statistics are per rank under DDP (BatchNorm without sync): each rank's batch is large
        (B x N latents per channel) and the checkpoint keeps rank zero's running values."""
        gen = self.generator
        if not self.training:
            return gen.normalise(z)
        zd = z.detach().float()
        mean, var = zd.mean((0, 1)), zd.var((0, 1), unbiased=False)  # (C,)
        with torch.no_grad():
            m = self.spec.bn_momentum
            gen.latent_mean.lerp_(mean, m)
            gen.latent_std.copy_(gen.latent_std.square().lerp(zd.var((0, 1), unbiased=True), m).sqrt())
        return (z - mean.to(z)) / (var.to(z) + 1e-6).sqrt()

    # --- training ---
    def training_k(self) -> int:
        return self.k_cycle[self.global_step % len(self.k_cycle)]

    def recon_k(self) -> int:
        """A reconstruction level drawn from the stage-1 grid weights (restricted to the served K)."""
        merge = self.hparams.merge or MergeSpec(grid=self.ks)
        weights = dict(zip(merge.grid, merge.grid_weights or [1.0] * len(merge.grid), strict=True))
        w = torch.tensor([weights.get(k, 1.0) for k in self.recon_grid])
        return self.recon_grid[int(torch.multinomial(w, 1))]

    def losses(self, batch: ImageBatch, k: int, recon_k: int) -> dict[str, Tensor]:
        """Every loss term of one step at DiT level K and reconstruction level recon_k."""
        gen, pattern = self.generator, self.generator.pattern
        images, y = batch.image, gen.labels(batch.label)
        enc = gen.tokenizer.net.encode(images)  # z: (B, N, C)
        recon = self.criterion(images, self.decode_at(enc.z, recon_k), kl=enc.kl, align=enc.kl.new_zeros(()))
        gbar, sizes = pattern.gbar(k), pattern.sizes(k)
        path = gen.flow.noisy(pattern.merge(self.normalise(enc.z), k), gbar)  # x_t: (B, K, C), live
        drop = None  # one label-dropout draw shared by both DiT passes
        if self.training and gen.dit.cfg.class_dropout > 0:
            drop = (torch.rand(y.shape[0], device=y.device) < gen.dit.cfg.class_dropout).long()
        target = pattern.merge(self.target(images), k)  # (B, K, F)
        kw = {"depth": self.align_depth, "force_drop_ids": drop}
        out = gen.dit.forward_hidden(path.x_t.detach(), path.t, y, gbar, sizes, **kw)
        diffusion = gen.flow.velocity_loss(out.velocity, path.target.detach(), sizes)
        align_dit = alignment_loss(self.projector(out.hidden), target)  # trains DiT + projector
        with frozen_params(gen.dit, self.projector):
            hidden = gen.dit.hidden_states(path.x_t, path.t, y, gbar, sizes, **kw)  # (B, K, D)
            align_tok = alignment_loss(self.projector(hidden), target)  # trains the tokenizer only
        s = self.spec
        total = s.diffusion * diffusion["loss"] + s.align * (align_dit + align_tok) + s.recon * recon["loss"]
        return dict(
            loss=total, diffusion=diffusion["loss"], mse=diffusion["mse"], align_dit=align_dit,
            align_tok=align_tok, recon=recon["loss"], l2=recon["l2"], kl=recon["kl"],
        )  # fmt: skip

    def training_step(self, batch: ImageBatch, batch_idx: int) -> Tensor:
        k = self.training_k()
        parts = self.losses(batch, k, recon_k=self.recon_k())
        self.log_dict({f"train/{name}": value for name, value in parts.items()})
        self.log("train/k", float(k))
        return parts["loss"]

    def param_groups(self) -> list[dict]:
        """Optimizer groups: each part at its own peak learning rate (`part_lr`, else `optim.lr`; 0 keeps
        the part where it is)."""
        gen, groups, optim = self.generator, [], self.hparams.optim
        parts = (("tokenizer", gen.tokenizer.net), ("dit", gen.dit), ("projector", self.projector))
        for part, module in parts:
            lr = getattr(self.hparams.part_lr, part)
            lr = optim.lr if lr is None else lr
            groups += [{**g, "lr": lr} for g in param_groups(module, optim.weight_decay) if g["params"]]
        return groups

    def configure_optimizers(self) -> dict:
        return self.hparams.optim.build(self.param_groups(), self.trainer.max_steps)

    # --- validation: diffusion loss and PSNR per K ---
    def validation_step(self, batch: ImageBatch, batch_idx: int) -> None:
        gen, images = self.generator, batch.image
        y, z = gen.labels(batch.label), gen.tokenizer.encode(images)  # z: (B, N, C)
        for k in self.ks:
            gbar, sizes = gen.pattern.gbar(k), gen.pattern.sizes(k)
            path = gen.flow.noisy(gen.pattern.merge(self.normalise(z), k), gbar)
            v = gen.dit(path.x_t, path.t, y, gbar, sizes)
            self.val_loss[str(k)].update(gen.flow.velocity_loss(v, path.target, sizes)["loss"])
            self.val_psnr[str(k)].update(psnr(images, self.decode_at(z, k)))

    def on_validation_epoch_end(self) -> None:
        for k in self.ks:
            self.log(f"val/loss@k{k}", self.val_loss[str(k)].compute())
            self.log(f"val/psnr@k{k}", self.val_psnr[str(k)].compute())
            self.val_loss[str(k)].reset()
            self.val_psnr[str(k)].reset()

    # --- checkpoints and exports ---
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vlt_stage"] = "joint"

    def on_fit_end(self) -> None:
        """Export the final (EMA, if any) generator and its tokenizer into <run_dir>/export/."""
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.trainer.is_global_zero:
            self.export(Path(log_dir or self.trainer.default_root_dir) / "export")

    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write export folders `generator/` and `tokenizer/` under out_dir; returns their paths."""
        out = Path(out_dir)
        gen = self.generator
        return {
            "generator": export(gen, out / "generator"),
            "tokenizer": export(gen.tokenizer, out / "tokenizer"),
        }

    # --- decoding, generation and the token-budget protocol ---
    def decode_at(self, z: Tensor, k: int) -> Tensor:
        """z (B, N, C) -> merge to K with the frozen pattern, unmerge, decode -> (B, 3, H, W)."""
        tok = self.generator.tokenizer
        return tok.detokenize(tok.merge(z, k).tokens)

    def budget_reconstruct(self, images: Tensor, k: int) -> Tensor:
        return self.decode_at(self.generator.tokenizer.encode(images), k)

    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float | None, generator=None) -> Tensor:
        return self.generator.generate(labels, k, cfg_scale=cfg_scale, generator=generator)

    def budget_tokens(self, k: int) -> float:
        return float(k)

    def budget_flops(self, k: int, task: str = "reconstruct", cfg_scale: float | None = 1.0) -> float:
        """Reconstruct: encode + decode. Generate: DiT calls of every sampling step + one decode."""
        if task == "reconstruct":
            return float(self.generator.tokenizer.flops("reconstruct"))
        return self.generator.flops(k, cfg_scale)
