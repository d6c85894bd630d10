"""Stage 2 system: one DiT for every K on merged latents of a frozen tokenizer's cache.

Letters: B batch, N slots, K merged tokens, C channels.

Batches hold the full N-slot latents; each step picks one K (from a cycle: one K per batch, no
padding), normalises with the cache's channel statistics, merges with the tokenizer's fixed
Gbar_K and trains the rectified flow. The merge table and the statistics are buffers, so a
checkpoint samples on its own; the tokenizer (for decoding) is loaded on demand and never saved here.

Content-adaptive K (vlt's extension, k_source="data"): each image has its own K_i from `vlt allocate`,
the datamodule buckets batches by K_i, each step trains at its batch's K and the DiT embeds K in its
conditioning. p(K | class) from the allocation is a buffer, so sampling draws K per image (or tilts
p(K | class) to a mean-K budget) from the checkpoint alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlt.checkpoints import load_checkpoint
from vlt.data.latents import cache_meta, latent_stats
from vlt.lit.dit_adaptive import K_SOURCES, AdaptiveK, KSource, allocation_buffers, batch_k
from vlt.lit.specs import OptimSpec, allow_in_checkpoints, param_groups
from vlt.models.dit import DiT, DiTConfig
from vlt.models.merge_ops import MergeTable, column_normalise, merge, one_hot, unmerge
from vlt.objectives.flow import RectifiedFlow


@dataclass
class FlowSpec:
    """Rectified-flow training and sampling settings (see `vlt.objectives.flow`)."""

    t_mean: float = 0.0
    t_std: float = 1.0
    sample_steps: int = 25
    sampler: str = "euler"
    cfg_scale: float = 1.5
    cfg_interval: tuple[float, float] | None = None


allow_in_checkpoints(DiTConfig, FlowSpec)


def paper_cycle(n: int) -> list[int]:
    """The reference schedule's 4:2:1 proportions at N/2, N/4, N/8 (K = 128, 64, 32 for N = 256)."""
    return [n // 2] * 4 + [n // 4] * 2 + [n // 8]


class PatternBuffers:
    """The global merge pattern as buffers `assign_<K>` over `self.ks`, so a checkpoint carries it.

    Mixed into the modules that merge with a fixed pattern (stage 2 `LitDiT`, stage 3 `LitJoint`);
    they set `self.ks` and own `self.dit` (for N).
    """

    def register_pattern(self, n: int, ks: list[int], table: MergeTable | None = None) -> None:
        """One buffer per K: the table's assignment, or contiguous groups until real weights load."""
        for k in ks:
            assign = table.assign[k] if table and k in table.assign else torch.arange(n) * k // n
            self.register_buffer(f"assign_{k}", assign.clone().long())

    def table(self) -> MergeTable:
        """The pattern over `ks` as a MergeTable (on the CPU)."""
        return MergeTable(
            n=self.dit.cfg.n_slots, assign={k: getattr(self, f"assign_{k}").cpu() for k in self.ks}
        )

    def pattern(self, k: int) -> tuple[Tensor, Tensor]:
        """Gbar (N, K) and sizes (K,) of level K on this module's device."""
        if k not in self.ks:
            raise ValueError(f"K={k} is not served by this DiT; choose one of {self.ks}")
        gamma = one_hot(getattr(self, f"assign_{k}"), k)  # (N, K)
        return column_normalise(gamma), gamma.sum(0)


class LitDiT(PatternBuffers, AdaptiveK, L.LightningModule):
    """DiT + rectified flow over the tokenizer's merged latents.

    Args:
        dit: the DiT config (N and C must match the cache).
        cache: latent cache folder written by `vlt cache-latents` (merge table + statistics).
        tokenizer: the stage-1 checkpoint that produced the cache, for decoding samples (optional).
        ks: the K values this model serves (default: every K of the cache's merge table).
        k_cycle: K per training step, cycled (default: `paper_cycle(N)`); k_source="cycle" only.
        flow: flow and sampler settings.
        optim: optimizer and schedule.
        k_source: "cycle" (one K per step from k_cycle) or "data" (each step at its batch's K_i,
            content-adaptive; needs dit.k_conditioning and a datamodule with an allocation).
        allocation: allocation.json of `vlt allocate` (k_source="data"; default <cache>/allocation.json),
            read for p(K | class) and its K grid (a subset of ks).
    """

    def __init__(
        self,
        *,
        dit: DiTConfig | None = None,
        cache: str | None = None,
        tokenizer: str | None = None,
        ks: list[int] | None = None,
        k_cycle: list[int] | None = None,
        flow: FlowSpec | None = None,
        optim: OptimSpec | None = None,
        k_source: KSource = "cycle",
        allocation: str | None = None,
    ) -> None:
        super().__init__()
        if k_source not in K_SOURCES:
            raise ValueError(f"k_source={k_source!r} is not supported; choose one of {K_SOURCES}")
        dit, flow, optim = (
            dit or DiTConfig(),
            flow or FlowSpec(),
            optim or OptimSpec(lr=3e-4, warmup_steps=500),
        )
        table = MergeTable.load(Path(cache) / "merge_table.json") if cache else None
        ks = sorted(ks or (table.ks if table else [dit.n_slots]))
        self.save_hyperparameters(
            {
                "dit": dit,
                "cache": cache,
                "tokenizer": tokenizer,
                "ks": ks,
                "k_cycle": k_cycle,
                "flow": flow,
                "optim": optim,
                "k_source": k_source,
                "allocation": allocation,
            }
        )
        self.dit = DiT(dit)
        self.flow, self.flow_spec, self.optim_spec = (
            RectifiedFlow(t_mean=flow.t_mean, t_std=flow.t_std),
            flow,
            optim,
        )
        self.ks = ks
        self.k_cycle = k_cycle or [k for k in paper_cycle(dit.n_slots) if k in ks] or ks
        # The global pattern per K and the latent statistics travel inside every checkpoint.
        self.register_pattern(dit.n_slots, ks, table)
        mean, std = (
            latent_stats(cache)
            if cache and _has_stats(cache)
            else (torch.zeros(dit.channels), torch.ones(dit.channels))
        )
        self.register_buffer("latent_mean", mean)
        self.register_buffer("latent_std", std)
        self.k_source = k_source
        if k_source == "data":
            path = allocation or (str(Path(cache) / "allocation.json") if cache else None)
            probs, grid = allocation_buffers(path, dit, ks)
            self.register_buffer("k_probs", probs)  # (num_classes + 1, G) p(K | class)
            self.register_buffer("k_grid", grid)  # (G,)
        # Constant buffers: keep DDP from broadcasting them on every forward, which would hang
        # validation when ranks hold different numbers of batches (exactly-once split).
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
        self.val_loss = nn.ModuleDict({str(k): MeanMetric() for k in ks})
        if k_source == "data":
            self.val_loss_adaptive = MeanMetric()
        self._decoder: list = []  # the tokenizer, loaded lazily; a list keeps it out of state_dict

    # --- the merge pattern and the normalisation ---
    def normalise(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalise(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    def labels(self, y: Tensor) -> Tensor:
        """Unlabelled samples (-1) train the unconditional branch."""
        return torch.where(y < 0, torch.full_like(y, self.dit.null_label), y)

    # --- training ---
    def training_k(self, batch: dict | None = None) -> int:
        """The step's K: from the cycle, the same on every rank (it follows global_step), or the batch's."""
        if self.k_source == "data":
            return batch_k(batch)
        return self.k_cycle[self.global_step % len(self.k_cycle)]

    def _loss(self, batch: dict, k: int) -> dict[str, Tensor]:
        gbar, sizes = self.pattern(k)
        x1 = merge(self.normalise(batch["latent"]), gbar)  # (B, K, C)
        return self.flow.training_losses(self.dit, x1, self.labels(batch["label"]), gbar, sizes)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        k = self.training_k(batch)
        parts = self._loss(batch, k)
        self.log_dict({"train/loss": parts["loss"], "train/mse": parts["mse"], "train/k": float(k)})
        return parts["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        own = batch_k(batch) if self.k_source == "data" else None
        for k in self.ks:
            loss = self._loss(batch, k)["loss"]
            self.val_loss[str(k)].update(loss)
            if k == own:  # content-adaptive: the loss at the images' own K, weighted per image
                self.val_loss_adaptive.update(loss, len(batch["label"]))

    def on_validation_epoch_end(self) -> None:
        for k in self.ks:
            self.log(f"val/loss@k{k}", self.val_loss[str(k)].compute())
            self.val_loss[str(k)].reset()
        if self.k_source == "data":
            self.log("val/loss_adaptive", self.val_loss_adaptive.compute())
            self.val_loss_adaptive.reset()

    def configure_optimizers(self) -> dict:
        return self.optim_spec.build(
            param_groups(self.dit, self.optim_spec.weight_decay), self.trainer.max_steps
        )

    def setup(self, stage: str) -> None:
        """Fail early, with the fix, when the cache and this model disagree."""
        if stage != "fit" or not self.hparams.cache:
            return
        meta = cache_meta(self.hparams.cache, "train")
        cfg = self.dit.cfg
        if (meta["n_slots"], meta["channels"]) != (cfg.n_slots, cfg.channels):
            raise ValueError(
                f"latent cache {self.hparams.cache} holds {meta['n_slots']}x{meta['channels']} latents but "
                f"the DiT expects N={cfg.n_slots}, C={cfg.channels}: set model.dit.n_slots/channels "
                "to the tokenizer's"
            )
        if self.hparams.tokenizer:
            check_tokenizer(self.hparams.tokenizer, self.table())

    # --- sampling and decoding ---
    def decoder(self):
        """The frozen stage-1 tokenizer named by `tokenizer` (loaded once, kept out of checkpoints)."""
        if not self._decoder:
            if not self.hparams.tokenizer:
                raise ValueError(
                    "this LitDiT has no tokenizer checkpoint to decode with: set model.tokenizer"
                )
            from vlt.lit.tokenizer import LitTokenizer

            tok = LitTokenizer.load_from_checkpoint(self.hparams.tokenizer, map_location="cpu").eval()
            self._decoder.append(tok.requires_grad_(False))
        tok = self._decoder[0]
        return tok.to(self.device)

    @torch.no_grad()
    def generate_latents(
        self,
        labels: Tensor,
        k: int,
        *,
        cfg_scale: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample merged latents (B, K, C), denormalised (the tokenizer's latent space)."""
        spec = self.flow_spec
        gbar, sizes = self.pattern(k)
        x = self.flow.sample(
            self.dit,
            y=labels.to(self.device),
            gbar=gbar,
            sizes=sizes,
            steps=steps or spec.sample_steps,
            method=spec.sampler,
            cfg_scale=spec.cfg_scale if cfg_scale is None else cfg_scale,
            cfg_interval=spec.cfg_interval,
            generator=generator,
        )
        return self.denormalise(x)

    @torch.no_grad()
    def generate(self, labels: Tensor, k: int, **kwargs) -> Tensor:
        """Sample images (B, 3, H, W) in [-1, 1] at K tokens: sample, unmerge, decode."""
        tokens = self.generate_latents(labels, k, **kwargs)  # (B, K, C)
        z = unmerge(tokens, one_hot(getattr(self, f"assign_{k}"), k))  # (B, N, C)
        return self.decoder().tokenizer.decode(z).clamp(-1, 1)

    # --- the token-budget protocol (vlt.callbacks.token_budget) ---
    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float, generator=None) -> Tensor:
        return self.generate(labels, k, cfg_scale=cfg_scale, generator=generator)

    def budget_tokens(self, k: int) -> float:
        return float(k)

    def budget_flops(self, k: int, task: str = "generate", cfg_scale: float = 1.0) -> float:
        """DiT forward x sampling steps (x2 with guidance, x2 for Heun) + one tokenizer decode."""
        spec = self.flow_spec
        calls = spec.sample_steps * (2 if spec.sampler == "heun" else 1) * (2 if cfg_scale != 1.0 else 1)
        return float(calls * self.dit.flops(k) + self.decoder().flops("decode"))


def _has_stats(cache: str) -> bool:
    return any(Path(cache).glob("stats-train-r*.json"))


def check_tokenizer(path: str, table: MergeTable) -> None:
    """The tokenizer checkpoint must carry the same merge pattern as the cache the DiT learns from."""
    ckpt = load_checkpoint(path, expect="tokenizer", config_key="model.init_args.tokenizer")
    stored = ckpt.get("merge_table")
    if stored is None:
        return
    theirs = MergeTable.from_dict(stored)
    for k in table.ks:
        if k in theirs.assign and not torch.equal(theirs.assign[k], table.assign[k]):
            raise ValueError(
                f"merge pattern mismatch at K={k} between tokenizer {path} and the latent cache: the "
                "cache was made by another tokenizer; rebuild it with `vlt cache-latents`"
            )
