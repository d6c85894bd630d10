"""Stage 2 system: trains a `LatentGenerator` (one DiT for every K) on a frozen tokenizer's latent cache.

Letters: B batch, N slots, K merged tokens, C channels.

Batches hold the full N-slot latents; each step picks one K (from a cycle: one K per batch, no
padding), normalises with the cache's channel statistics, merges with the fixed pattern and trains
the rectified flow. The generator owns the pattern, the statistics and a frozen copy of the
tokenizer, so a checkpoint samples and decodes on its own (`vlt.load(ckpt)`), with no cache and no
stage-1 file.

The constructor does no file I/O: it builds modules of the shapes it is given. The CLI (and
`LitDiT.from_cache`) fills those shapes from the sources (`resolve_sources`: the cache's pattern,
the tokenizer checkpoint's config, the allocation's K grid); a new fit then reads their values once
(`load_sources`, at setup). A resumed fit takes every value from its checkpoint.

Content-adaptive K (vlt's extension, k_source="data"): each image has its own K_i from `vlt allocate`,
the datamodule buckets batches by K_i, each step trains at its batch's K and the DiT embeds K in its
conditioning; the generator keeps p(K | class) to sample one K per image.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlt.data.cache import LatentCache, load_allocation
from vlt.models.dit import DiTBlock, DiTConfig
from vlt.models.pattern import PatternKind
from vlt.models.tokenizer import TokenizerConfig
from vlt.nn.compile import compile_blocks
from vlt.nn.lora import lora_parameters
from vlt.objectives.flow import FlowSpec
from vlt.objectives.schedule import orthogonal_part
from vlt.specs import LoRASpec, OptimSpec, param_groups
from vlt.stages import AdaptiveSamples, LatentGenerator, load
from vlt.stages.export import build_generator
from vlt.types import LatentBatch

KSource = Literal["cycle", "data"]
K_SOURCES: tuple[str, ...] = get_args(KSource)


def paper_cycle(n: int) -> list[int]:
    """The reference schedule's 4:2:1 proportions at N/2, N/4, N/8 (K = 128, 64, 32 for N = 256)."""
    return [n // 2] * 4 + [n // 4] * 2 + [n // 8]


def train_cycle(k_cycle: list[int] | None, ks: list[int], n: int) -> list[int]:
    """The training K cycle restricted to the K the pattern serves (the paper's cycle by default)."""
    cycle = [k for k in (k_cycle or paper_cycle(n)) if k in ks]
    if k_cycle and not cycle:
        raise ValueError(f"k_cycle {k_cycle} holds none of the K this pattern serves ({ks}): set k_cycle")
    return cycle or ks


def batch_k(batch: LatentBatch) -> int:
    """The one K of a bucketed batch; a clear error when the batch has none or mixes several."""
    ks = batch.k.unique().tolist()
    if len(ks) != 1 or ks[0] < 0:
        raise ValueError(
            f"k_source='data' needs batches of one allocated K, got K values {ks} (-1: none): set "
            "data.init_args.allocation to the allocation.json of `vlt allocate` so batches are "
            "bucketed by K"
        )
    return int(ks[0])


class LitDiT(L.LightningModule):
    """DiT + rectified flow over the tokenizer's merged latents.

    Args:
        dit: the DiT config (N and C must match the cache).
        cache: latent cache folder of `vlt cache-latents` (pattern + statistics), read at fit start.
        tokenizer: the stage-1 checkpoint (or export) that made the cache; its weights are copied in
            at fit start so samples decode without it.
        tokenizer_config: the tokenizer's config (None: no decoder); filled from `tokenizer` by the CLI.
        ks: the K values served (a subset of the cache's pattern; default: all of it, or N alone).
        pattern_kind: the scheme of the pattern: lgm, nested or fixed, filled from the cache (None
            without a cache: a contiguous placeholder until `load_sources`).
        k_cycle: K per training step, cycled (default: `paper_cycle(N)`); k_source="cycle" only. K
            the pattern does not serve are left out (a fixed-K tokenizer's pattern serves one K).
        flow: flow and sampler settings. optim: optimizer and schedule.
        k_source: "cycle" (one K per step from k_cycle) or "data" (each step at its batch's K_i,
            content-adaptive; needs dit.k_conditioning and a datamodule with an allocation).
        allocation: allocation.json of `vlt allocate` (k_source="data"; default <cache>/allocation.json).
        prior_grid: the allocation's K grid (filled from `allocation`).
        lora: train only the adapters of one K on a frozen base DiT (`LoRASpec`; the paper's "a DiT
            per K"): every step runs at `lora.k`, the base weights come from `lora.base` at fit start.
        compile: torch.compile each DiT block (`vlt.nn.compile`; for GPUs: the first steps wait for the
            compiler, and a new K shape compiles again once).
    """

    def __init__(
        self,
        *,
        dit: DiTConfig = DiTConfig(),  # noqa: B008 (config values, never mutated)
        cache: str | None = None,
        tokenizer: str | None = None,
        tokenizer_config: TokenizerConfig | None = None,
        ks: list[int] | None = None,
        pattern_kind: PatternKind | None = None,
        k_cycle: list[int] | None = None,
        flow: FlowSpec = FlowSpec(),  # noqa: B008
        optim: OptimSpec = OptimSpec(lr=3e-4, warmup_steps=500),  # noqa: B008
        k_source: KSource = "cycle",
        allocation: str | None = None,
        prior_grid: list[int] | None = None,
        lora: LoRASpec | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(init_args(locals()))
        if k_source not in K_SOURCES:
            raise ValueError(f"k_source={k_source!r} is not supported; choose one of {K_SOURCES}")
        if k_source == "data" and not dit.k_conditioning:
            raise ValueError(
                "k_source='data' trains one DiT on batches of different K, so the DiT must know K: set "
                "model.init_args.dit.k_conditioning=true (or use k_source='cycle')"
            )
        if k_source == "data" and prior_grid is None:
            raise ValueError(
                "k_source='data' needs prior_grid (set allocation, or build with LitDiT.from_cache)"
            )
        ks = self.hparams.ks = sorted(ks or [dit.n_slots])
        kind = self.hparams.pattern_kind = pattern_kind or "contiguous"
        if lora is not None:
            dit, k_cycle = lora_setup(dit, lora, ks, k_source)
            self.hparams.dit, self.hparams.k_cycle = dit, k_cycle
        self.generator = build_generator(
            dit, {"n": dit.n_slots, "ks": ks, "kind": kind}, flow=flow, tokenizer=tokenizer_config,
            prior_grid=prior_grid,
        )  # fmt: skip
        self.ks, self.k_source, self.optim_spec = ks, k_source, optim
        self.k_cycle = train_cycle(k_cycle, ks, dit.n_slots)
        if lora is not None:
            freeze_all_but_adapters(self.generator.dit, lora.k)
        # Constant buffers: keep DDP from broadcasting them on every forward, which would hang
        # validation when ranks hold different numbers of batches (exactly-once split).
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
        self.val_loss = nn.ModuleDict({str(k): MeanMetric() for k in ks})
        if k_source == "data":
            self.val_loss_adaptive = MeanMetric()

    # --- building from files (the CLI's job, or this factory's) ---
    @classmethod
    def resolve_sources(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Fill the shape arguments left None from the files the arguments name."""
        args = dict(args)
        if args.get("cache") and args.get("ks") is None:
            pattern = LatentCache(args["cache"]).pattern()
            args["ks"], args["pattern_kind"] = pattern.ks, pattern.kind
        if args.get("tokenizer") and args.get("tokenizer_config") is None:
            args["tokenizer_config"] = load(args["tokenizer"], part="tokenizer").cfg
        if args.get("k_source") == "data" and args.get("prior_grid") is None:
            args["prior_grid"] = list(load_allocation(_allocation_path(args))["grid"])
        return args

    @classmethod
    def from_cache(cls, cache: str, *, tokenizer: str | None = None, **kwargs: Any) -> LitDiT:
        """A model shaped by and filled from a latent cache (and its tokenizer), ready to fit or sample."""
        model = cls(**cls.resolve_sources({"cache": cache, "tokenizer": tokenizer, **kwargs}))
        model.load_sources()
        return model

    @torch.no_grad()
    def load_sources(self) -> None:
        """Copy the pattern, statistics, tokenizer weights and p(K | class) from the named files."""
        hp, gen = self.hparams, self.generator
        if hp.cache:
            cache = LatentCache(hp.cache)
            check_cache(cache, gen.dit.cfg)
            source = cache.pattern()
            for k in self.ks:
                gen.pattern.assignment(k).copy_(source.assignment(k))
            gen.pattern.kind = source.kind
            gen.latent_mean.copy_(cache.stats("train")[0])
            gen.latent_std.copy_(cache.stats("train")[1])
        if hp.tokenizer and gen.tokenizer is not None:
            source = f"tokenizer {hp.tokenizer} (the latent cache {hp.cache} was made by another tokenizer?)"
            gen.take_tokenizer(load(hp.tokenizer, part="tokenizer"), source=source)
        if self.k_source == "data":
            gen.k_probs.copy_(prior_probs(_allocation_path(hp), gen))
        if hp.lora is not None and hp.lora.base:
            load_lora_base(gen, load(hp.lora.base), hp.lora.k, source=hp.lora.base)

    def setup(self, stage: str) -> None:
        """A new fit reads its sources; a resumed one (ckpt_path) restores everything after this hook."""
        if stage == "fit" and not self.trainer.ckpt_path:
            self.load_sources()

    def configure_model(self) -> None:
        """With `compile`, compile the DiT's blocks in place (after the sources are loaded)."""
        if self.hparams.compile:
            compile_blocks(self.generator.dit, (DiTBlock,))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vlt_stage"] = "dit"

    # --- training ---
    def training_k(self, batch: LatentBatch | None = None) -> int:
        """The step's K: from the cycle, the same on every rank (it follows global_step), or the batch's."""
        if self.k_source == "data":
            return batch_k(batch)
        return self.k_cycle[self.global_step % len(self.k_cycle)]

    def _loss(self, batch: LatentBatch, k: int, *, train: bool = False) -> dict[str, Tensor]:
        gen, spec = self.generator, self.generator.spec
        z = gen.normalise(batch.latent)  # (B, N, C)
        x1, y = gen.pattern.merge(z, k), gen.labels(batch.label)  # (B, K, C), (B,)
        gbar, sizes = gen.pattern.gbar(k), gen.pattern.sizes(k)
        coarser = [a for a in gen.ks if a < k]
        if not (train and spec.split_prob > 0 and coarser):
            return gen.flow.training_losses(gen.dit, x1, y, gbar, sizes)
        # Coarse-to-fine training: the split came from a coarser level of the pattern, drawn per step;
        # its state holds the parents' means plus the detail the sampler draws (`split_detail`).
        a = coarser[int(torch.randint(len(coarser), ()))]
        drawn = spec.split_detail * orthogonal_part(torch.randn_like(z), gen.pattern.gbar(a).to(z))
        parent = gen.pattern.merge(gen.pattern.unmerge(gen.pattern.merge(z, a)) + drawn, k)  # (B, K, C)
        path = gen.flow.split_noisy(x1, parent, gbar, spec.split_prob, spec.split_max_t)
        return gen.flow.velocity_loss(gen.dit(path.x_t, path.t, y, gbar, sizes), path.target, sizes)

    def training_step(self, batch: LatentBatch, batch_idx: int) -> Tensor:
        k = self.training_k(batch)
        parts = self._loss(batch, k, train=True)
        self.log_dict({"train/loss": parts["loss"], "train/mse": parts["mse"], "train/k": float(k)})
        return parts["loss"]

    def validation_step(self, batch: LatentBatch, batch_idx: int) -> None:
        own = batch_k(batch) if self.k_source == "data" else None
        for k in self.ks:
            loss = self._loss(batch, k)["loss"]
            self.val_loss[str(k)].update(loss)
            if k == own:  # content-adaptive: the loss at the images' own K, weighted per image
                self.val_loss_adaptive.update(loss, len(batch.label))

    def on_validation_epoch_end(self) -> None:
        for k in self.ks:
            self.log(f"val/loss@k{k}", self.val_loss[str(k)].compute())
            self.val_loss[str(k)].reset()
        if self.k_source == "data":
            self.log("val/loss_adaptive", self.val_loss_adaptive.compute())
            self.val_loss_adaptive.reset()

    def optimizer_groups(self) -> list[dict]:
        """The optimizer's parameter groups: the DiT's trainable weights (only adapters with `lora`)."""
        return param_groups(self.generator.dit, self.optim_spec.weight_decay)

    def configure_optimizers(self) -> dict:
        return self.optim_spec.build(self.optimizer_groups(), self.trainer.max_steps)

    # --- the token-budget protocol (vlt.callbacks.token_budget) ---
    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float | None, generator=None) -> Tensor:
        return self.generator.generate(labels, k, cfg_scale=cfg_scale, generator=generator)

    def budget_generate_adaptive(
        self, labels: Tensor, budget: float, cfg_scale: float | None, generator: torch.Generator | None = None
    ) -> AdaptiveSamples:
        return self.generator.generate_adaptive(labels, budget, cfg_scale=cfg_scale, generator=generator)

    def budget_tokens(self, k: int) -> float:
        return float(k)

    def budget_flops(self, k: int, task: str = "generate", cfg_scale: float | None = 1.0) -> float:
        """Every DiT call of the sampler (x2 with guidance, x2 for Heun) + one tokenizer decode."""
        return self.generator.flops(k, cfg_scale)


def init_args(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its `locals()`, for `save_hyperparameters` (plain values and
    config dataclasses, so `vlt.load` reads them back without Lightning or the CLI)."""
    return {key: value for key, value in frame_locals.items() if key not in ("self", "__class__")}


def _allocation_path(hp: Any) -> str:
    get = hp.get if isinstance(hp, dict) else lambda key: getattr(hp, key, None)
    path = get("allocation") or (
        str(LatentCache(get("cache")).root / "allocation.json") if get("cache") else None
    )
    if path is None:
        raise ValueError("k_source='data' needs an allocation: set model.init_args.allocation or cache")
    return path


def prior_probs(path: str, gen: LatentGenerator) -> Tensor:
    """p(K | class) (num_classes + 1, G) of an allocation, checked against the generator's prior grid."""
    meta = load_allocation(path)
    probs = torch.tensor(meta["p_k_given_class"], dtype=torch.float32)
    grid = [int(k) for k in meta["grid"]]
    if grid != gen.k_grid.tolist() or probs.shape != gen.k_probs.shape:
        raise ValueError(
            f"allocation {path}: grid {grid} and p_k_given_class {tuple(probs.shape)} do not match this "
            f"model's prior (grid {gen.k_grid.tolist()}, {tuple(gen.k_probs.shape)} for "
            f"num_classes={gen.dit.cfg.num_classes})"
        )
    return probs


def check_cache(cache: LatentCache, cfg: DiTConfig) -> None:
    """Fail early, with the fix, when the cache and the DiT disagree on the latent shape."""
    meta = cache.meta("train")
    if (meta["n_slots"], meta["channels"]) != (cfg.n_slots, cfg.channels):
        raise ValueError(
            f"latent cache {cache.root} holds {meta['n_slots']}x{meta['channels']} latents but the DiT "
            f"expects N={cfg.n_slots}, C={cfg.channels}: set model.dit.n_slots/channels to the tokenizer's"
        )


def lora_setup(dit: DiTConfig, lora: LoRASpec, ks: list[int], k_source: str) -> tuple[DiTConfig, list[int]]:
    """The DiT config with adapters for `lora.k` (beside any it has) and the training cycle [k]."""
    if k_source != "cycle":
        raise ValueError("lora trains the adapters of one K: use k_source='cycle'")
    if lora.k not in ks:
        raise ValueError(f"lora.k={lora.k} is not a K this model serves ({ks}): set ks or lora.k")
    if dit.lora_ks and (dit.lora_rank, dit.lora_alpha) != (lora.rank, lora.alpha):
        raise ValueError(
            f"the DiT's adapters have rank {dit.lora_rank}, alpha {dit.lora_alpha}; lora asks for "
            f"rank {lora.rank}, alpha {lora.alpha}: adapters of one DiT share them"
        )
    lora_ks = sorted({*(dit.lora_ks or []), lora.k})
    return replace(dit, lora_ks=lora_ks, lora_rank=lora.rank, lora_alpha=lora.alpha), [lora.k]


def freeze_all_but_adapters(dit: nn.Module, k: int) -> None:
    """Only the adapters of K = k train; every other DiT weight stays as the base left it."""
    dit.requires_grad_(False)
    for _, param in lora_parameters(dit, k):
        param.requires_grad_(True)


@torch.no_grad()
def load_lora_base(gen: LatentGenerator, base: Any, k: int, *, source: str) -> None:
    """Copy the base generator's DiT into `gen.dit`; only the adapters of K = k may be missing."""
    if not isinstance(base, LatentGenerator):
        raise ValueError(f"lora.base {source} holds a {type(base).__name__}, not a stage-2 generator")
    if k not in base.ks or not base.pattern.subset([k]).equal(gen.pattern.subset([k])):
        raise ValueError(f"lora.base {source} does not carry this model's merge pattern at K={k}")
    result = gen.dit.load_state_dict(base.dit.state_dict(), strict=False)
    own = {name for name, _ in lora_parameters(gen.dit, k)}
    if result.unexpected_keys or set(result.missing_keys) - own:
        raise ValueError(
            f"lora.base {source}: its DiT does not match this one (missing "
            f"{sorted(set(result.missing_keys) - own)[:6]}, unexpected {result.unexpected_keys[:6]}): "
            "set model.init_args.dit to the base's DiT config"
        )
