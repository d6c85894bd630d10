"""Stage 2's inference contract: a latent generator = DiT + flow + latent statistics + one MergePattern.

Letters: B images, N slots, K tokens, C channels, G levels of an adaptive prior.

    gen = vlt.load("exports/dit-tiny")                 # or a stage-2 / joint checkpoint
    images = gen.generate(labels, k=8, generator=torch.Generator().manual_seed(0))
    samples = gen.generate_adaptive(labels, budget=8)  # one K per image, mean K = 8
    gen.flops(8)                                       # DiT calls of every step + one decode

Pure torch. The DiT works on normalised merged tokens; `generate_latents` returns them in the
tokenizer's latent space (denormalised), and `decode` unmerges them with the same pattern and
decodes with the tokenizer the generator carries, so an export samples on its own: no latent cache,
no stage-1 file. The tokenizer shares the generator's pattern module (one representation).

Content-adaptive K (vlt's extension): with `prior_grid` the generator holds p(K | class) (a buffer
filled from `vlt allocate`'s allocation.json); `choose_ks` draws each image's K from it, tilted to a
mean budget, and `generate_adaptive` samples each K's group at its K, in the order of the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlt.adaptive.allocation import draw, tilt_to_budget
from vlt.models.dit import DiT, DiTConfig
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec, RectifiedFlow
from vlt.stages.tokenizer import VariableLengthTokenizer


class AdaptiveSamples(NamedTuple):
    """Images (B, 3, H, W) in [-1, 1] in the order of the labels, and the K (B,) each was sampled at."""

    images: Tensor
    ks: Tensor


class LatentGenerator(nn.Module):
    """DiT + rectified flow over the merged latents of one global pattern, with the tokenizer to decode.

    Args:
        dit: the DiT's config (N and C of the tokenizer's latents).
        pattern: the global pattern; its levels are the K this generator serves.
        flow: training-time and sampling settings.
        tokenizer: the stage-1 tokenizer's config, to decode samples (None: latents only).
        prior_grid: the K grid of an adaptive p(K | class) prior (None: no prior).
    """

    def __init__(
        self,
        dit: DiTConfig,
        pattern: MergePattern,
        *,
        flow: FlowSpec | None = None,
        tokenizer: TokenizerConfig | None = None,
        prior_grid: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if pattern.n != dit.n_slots:
            raise ValueError(f"pattern over {pattern.n} slots for a DiT with n_slots={dit.n_slots}")
        if tokenizer is not None and (tokenizer.n_slots, tokenizer.channels) != (dit.n_slots, dit.channels):
            raise ValueError(
                f"tokenizer latents are {tokenizer.n_slots}x{tokenizer.channels} but the DiT expects "
                f"N={dit.n_slots}, C={dit.channels}"
            )
        self.dit = DiT(dit)
        self.pattern = pattern
        self.spec = flow or FlowSpec()
        self.flow = RectifiedFlow(t_mean=self.spec.t_mean, t_std=self.spec.t_std)
        self.tokenizer = VariableLengthTokenizer(tokenizer, pattern) if tokenizer is not None else None
        if self.tokenizer is not None:
            self.tokenizer.requires_grad_(False)
        self.register_buffer("latent_mean", torch.zeros(dit.channels))
        self.register_buffer("latent_std", torch.ones(dit.channels))
        if prior_grid is not None:
            if not set(prior_grid) <= set(pattern.ks):
                raise ValueError(
                    f"prior grid {list(prior_grid)} is not a subset of the pattern's {pattern.ks}"
                )
            self.register_buffer("k_grid", torch.tensor(sorted(prior_grid), dtype=torch.long))
            uniform = torch.full((dit.num_classes + 1, len(prior_grid)), 1.0 / len(prior_grid))
            self.register_buffer("k_probs", uniform)  # (num_classes + 1, G): p(K | class), last row: all

    @property
    def ks(self) -> list[int]:
        return self.pattern.ks

    @property
    def has_prior(self) -> bool:
        return hasattr(self, "k_probs")

    @torch.no_grad()
    def take_tokenizer(self, tok: VariableLengthTokenizer, *, source: str) -> None:
        """Decode with the weights of `tok` (named `source` in errors); it must carry this generator's
        pattern at every K it serves, or its decoder would read tokens it never made."""
        if self.tokenizer is None:
            raise ValueError("this generator was built without a tokenizer (tokenizer=None)")
        served = tok.pattern is not None and set(self.ks) <= set(tok.pattern.ks)
        if not served or not tok.pattern.subset(self.ks).equal(self.pattern):
            raise ValueError(
                f"merge pattern mismatch: {source} does not carry this generator's pattern at K={self.ks}"
            )
        self.tokenizer.net.load_state_dict(tok.net.state_dict())
        self.tokenizer.fill.copy_(tok.fill)

    # --- the latent space ---
    def normalise(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalise(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    def labels(self, y: Tensor) -> Tensor:
        """Unlabelled samples (-1) use the unconditional (null) label."""
        return torch.where(y < 0, torch.full_like(y, self.dit.null_label), y)

    # --- sampling ---
    @torch.no_grad()
    def generate_latents(
        self,
        labels: Tensor,
        k: int,
        *,
        cfg_scale: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Sample tokens (B, K, C) in the tokenizer's latent space (denormalised); `cfg_scale` None
        takes the spec's scale for this K (`FlowSpec.scale_at`); `noise` (B, N, C) is full-space
        starting noise (`vlt.objectives.flow.indexed_noise`) instead of drawing it from `generator`."""
        spec, device = self.spec, self.latent_mean.device
        x = self.flow.sample(
            self.dit,
            y=self.labels(labels.to(device)),
            gbar=self.pattern.gbar(k),
            sizes=self.pattern.sizes(k),
            steps=steps or spec.sample_steps,
            method=spec.sampler,
            shift=spec.timestep_shift,
            cfg_scale=spec.scale_at(k) if cfg_scale is None else cfg_scale,
            cfg_interval=spec.cfg_interval,
            generator=generator,
            noise=noise,
            noise_kind=spec.noise,
            guidance=spec.guidance,
        )  # (B, K, C)
        return self.denormalise(x)

    def decode(self, tokens: Tensor) -> Tensor:
        """Tokens (B, K, C) of the latent space -> images (B, 3, H, W) in [-1, 1]."""
        if self.tokenizer is None:
            raise ValueError("this generator carries no tokenizer to decode with (built with tokenizer=None)")
        return self.tokenizer.detokenize(tokens).clamp(-1, 1)

    @torch.no_grad()
    def generate(self, labels: Tensor, k: int, **kwargs) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] at K tokens: sample, unmerge, decode (kwargs: generate_latents)."""
        return self.decode(self.generate_latents(labels, k, **kwargs))

    def choose_ks(
        self, labels: Tensor, budget: float | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """K per image (B,) long on CPU, drawn from p(K | class) (uniform over `ks` without a prior),
        tilted to a mean-K budget if given. Draws are stratified (`vlt.adaptive.allocation.draw`)."""
        labels = labels.cpu().long()
        if self.has_prior:
            grid, rows = self.k_grid.tolist(), self.k_probs.cpu().double()  # (num_classes + 1, G)
            known = (labels >= 0) & (labels < self.dit.cfg.num_classes)
            p = rows[torch.where(known, labels, torch.full_like(labels, rows.shape[0] - 1))]  # (B, G)
        else:
            grid = self.ks
            p = torch.full((len(labels), len(grid)), 1.0 / len(grid), dtype=torch.float64)  # (B, G)
        if budget is not None:
            p, _ = tilt_to_budget(p, grid, float(budget))
        if generator is not None and generator.device.type != "cpu":  # draws run on the CPU
            seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
            generator = torch.Generator().manual_seed(int(seed))
        return draw(p, grid, generator)

    @torch.no_grad()
    def generate_adaptive(
        self,
        labels: Tensor,
        budget: float | None = None,
        *,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> AdaptiveSamples:
        """Images at one K per image (see `choose_ks`), each K's group sampled together, in order."""
        ks = self.choose_ks(labels, budget, generator)  # (B,)
        images: Tensor | None = None
        for k in ks.unique().tolist():
            index = (ks == k).nonzero().squeeze(1)  # (B_k,)
            group = self.generate(labels[index.to(labels.device)], k, generator=generator, **kwargs)
            if images is None:
                images = group.new_empty((len(ks), *group.shape[1:]))
            images[index.to(images.device)] = group  # (B_k, 3, H, W)
        return AdaptiveSamples(images, ks)

    def flops(self, k: int, cfg_scale: float | None = None) -> float:
        """Forward FLOPs per generated image: every DiT call of the sampler, plus one decode."""
        decode = self.tokenizer.flops("decode") if self.tokenizer is not None else 0
        return float(self.spec.model_calls(cfg_scale, k) * self.dit.flops(k) + decode)
