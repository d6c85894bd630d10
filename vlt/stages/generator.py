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

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlt.adaptive.allocation import draw, tilt_to_budget
from vlt.models.dit import DiT, DiTConfig
from vlt.models.pattern import MergePattern
from vlt.models.tokenizer import TokenizerConfig
from vlt.objectives.flow import FlowSpec, Guide, Level, RectifiedFlow, time_grid
from vlt.objectives.schedule import KSchedule, draw_split_noise
from vlt.stages.tokenizer import VariableLengthTokenizer


class AdaptiveSamples(NamedTuple):
    """Images (B, 3, H, W) in [-1, 1] in the order of the labels, and the K (B,) each was sampled at."""

    images: Tensor
    ks: Tensor


class DecidedSamples(NamedTuple):
    """`AdaptiveSamples` of a sampler that decides K while sampling, with the FLOPs (B,) each image cost."""

    images: Tensor
    ks: Tensor
    flops: Tensor


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
    def schedule(self, k: int | KSchedule | str) -> KSchedule:
        """K, a `KSchedule` or its text ("4,16@0.5") as a schedule over this generator's levels."""
        schedule = k if isinstance(k, KSchedule) else KSchedule.parse(k) if isinstance(k, str) else None
        schedule = schedule or KSchedule.constant(int(k))
        unknown = sorted(set(schedule.ks) - set(self.ks))
        if unknown:
            raise ValueError(f"K schedule {schedule} uses K={unknown}; this generator's levels: {self.ks}")
        if len(schedule.ks) > 1 and not self.pattern.subset(schedule.ks).nested():
            raise ValueError(f"K schedule {schedule}: its levels are not nested cuts, so tokens cannot split")
        if len(schedule.ks) > 1 and self.spec.noise != "pooled":
            raise ValueError(
                f"K schedule {schedule}: splitting tokens needs pooled noise (flow.noise: pooled)"
            )
        return schedule

    def _guide(self, scale: float) -> Guide:
        return Guide(scale, self.spec.cfg_interval, uniform=self.spec.guidance == "uniform")

    def split_count(self, k: int | KSchedule | str, steps: int | None = None) -> int:
        """How many times sampling at `k` (a K or a schedule) splits its tokens."""
        grid = time_grid(steps or self.spec.sample_steps, self.spec.timestep_shift)
        return sum(a != b for a, b in pairwise(self.schedule(k).ks_per_step(grid)))

    def levels(self, ks: Sequence[int]) -> dict[int, Level]:
        """The sampler's view of levels `ks` of the pattern, on the generator's device."""
        device = self.latent_mean.device
        p = self.pattern
        return {k: Level(p.gbar(k).to(device), p.sizes(k).to(device)) for k in ks}

    @torch.no_grad()
    def generate_latents(
        self,
        labels: Tensor,
        k: int | KSchedule | str,
        *,
        cfg_scale: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        split_noise: Sequence[Tensor] = (),
    ) -> Tensor:
        """Sample tokens (B, K, C) in the tokenizer's latent space (denormalised).

        k: the token count, or a `KSchedule` (coarse-to-fine: sampling starts at its first K and
        splits tokens as its phases start; the result has its final K). `cfg_scale` None takes the
        spec's scale at the final K (`FlowSpec.scale_at`). `noise` (B, N, C) is full-space starting
        noise (`vlt.objectives.flow.indexed_noise`) instead of drawing it from `generator`; likewise
        `split_noise`, one (B, N, C) per split (the rest are drawn from `generator`).
        """
        schedule = self.schedule(k)
        spec, grid = self.spec, time_grid(steps or self.spec.sample_steps, self.spec.timestep_shift)
        scale = spec.scale_at(schedule.final_k) if cfg_scale is None else cfg_scale
        x = self.flow.integrate(
            self.dit, y=self.labels(labels.to(self.latent_mean.device)), levels=self.levels(schedule.ks),
            step_ks=schedule.ks_per_step(grid), grid=grid, method=spec.sampler,
            guide=self._guide(scale), generator=generator, noise=noise, split_noise=split_noise,
            noise_kind=spec.noise, split_detail=spec.split_detail,
        )  # fmt: skip
        return self.denormalise(x)  # (B, K, C)

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

    @torch.no_grad()
    def generate_decided(
        self,
        labels: Tensor,
        schedule: KSchedule | str,
        decide: Callable[[Tensor, Tensor], Tensor],
        at: float,
        *,
        cfg_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> DecidedSamples:
        """Coarse-to-fine sampling with a final K per image, chosen while sampling.

        The batch follows `schedule` up to flow time `at`; there one more (conditional) DiT call
        predicts each image's clean coarse tokens x1 = x_t + (1 - t) v, and `decide(tokens, labels)`
        (tokens (B, Kd, C) in the latent space) returns each image's final K (B,) among the levels
        of this generator from the current one to the schedule's final K. Each K's group then
        follows the schedule capped at its K (`KSchedule.capped`), and is decoded. Images come back
        in the order of the labels, with the K each got and its FLOPs (`decided_flops`).
        """
        schedule, device = self.schedule(schedule), self.latent_mean.device
        grid = time_grid(self.spec.sample_steps, self.spec.timestep_shift)
        stop = self._decision_step(grid, at)
        step_ks, levels = schedule.ks_per_step(grid), self.levels(schedule.ks)
        scale = self.spec.scale_at(schedule.final_k) if cfg_scale is None else cfg_scale
        guide, y = self._guide(scale), self.labels(labels.to(device))
        run = dict(levels=levels, grid=grid, method=self.spec.sampler, guide=guide, generator=generator)
        run["split_detail"] = self.spec.split_detail
        x = self.flow.integrate(self.dit, y=y, step_ks=step_ks, stop=stop, **run)  # (B, Kd, C)
        kd, t = x.shape[1], grid[stop]
        if getattr(decide, "k", kd) != kd:
            raise ValueError(
                f"the decision reads K={decide.k} tokens, but {schedule} is at K={kd} at t={t:.3g}"
            )
        velocity = self.dit(x, torch.full((len(x),), t, device=device), y, levels[kd].gbar, levels[kd].sizes)
        ks = decide(self.denormalise(x + (1 - t) * velocity), labels).cpu().long()  # (B,)
        allowed = [k for k in self.ks if kd <= k <= schedule.final_k]
        if not set(ks.tolist()) <= set(allowed):
            raise ValueError(
                f"decide gave K={sorted(set(ks.tolist()))}; allowed: {allowed} (from K={kd} to {schedule})"
            )
        # The later splits' noise is drawn for the whole batch, so an image's noise does not depend
        # on which group it lands in (a capped schedule splits at a prefix of the same times).
        later = [kd, *step_ks[stop:]]
        count = sum(a != b for a, b in pairwise(later))
        noises = draw_split_noise(len(x), self.pattern.n, x.shape[2], count, generator, device)
        images: Tensor | None = None
        for k in ks.unique().tolist():
            index = (ks == k).nonzero().squeeze(1).to(device)  # (B_k,)
            capped = schedule.capped(k).ks_per_step(grid)
            split_noise = [eps[index.to(eps.device)] for eps in noises]
            tokens = self.flow.integrate(
                self.dit, y=y[index], x=x[index], step_ks=capped, start=stop, split_noise=split_noise, **run
            )
            group = self.decode(self.denormalise(tokens))  # (B_k, 3, H, W)
            images = group.new_empty((len(ks), *group.shape[1:])) if images is None else images
            images[index.to(images.device)] = group
        flops = {k: self.decided_flops(schedule, k, at, scale) for k in ks.unique().tolist()}
        return DecidedSamples(images, ks, torch.tensor([flops[k] for k in ks.tolist()], dtype=torch.float64))

    def decision_k(self, schedule: KSchedule | str, at: float) -> int:
        """The K that `generate_decided` decides at: the schedule's K in use at flow time `at`."""
        grid = time_grid(self.spec.sample_steps, self.spec.timestep_shift)
        return self.schedule(schedule).ks_per_step(grid)[max(self._decision_step(grid, at) - 1, 0)]

    @staticmethod
    def _decision_step(grid: Sequence[float], at: float) -> int:
        """The first step that starts at or after flow time `at` (0 < at < 1)."""
        if not 0 < at < 1:
            raise ValueError(f"the decision time must lie in (0, 1), got at={at}")
        return next(i for i, t in enumerate(grid) if t >= at - 1e-9)

    def decided_flops(
        self, schedule: KSchedule | str, k: int, at: float, cfg_scale: float | None = None
    ) -> float:
        """FLOPs per image of `generate_decided` for an image that got K = k: the schedule capped at k
        plus the decision's DiT call at the K in use at time `at` (the decision rule itself is not
        counted: a small MLP on Kd tokens)."""
        schedule = self.schedule(schedule)
        return self.flops(schedule.capped(k), cfg_scale) + self.dit.flops(self.decision_k(schedule, at))

    def flops(self, k: int | KSchedule | str, cfg_scale: float | None = None) -> float:
        """Forward FLOPs per generated image: every DiT call of the sampler, each at the K of its step
        (a `KSchedule` prices each phase at its own K), plus one decode."""
        schedule = self.schedule(k)
        decode = self.tokenizer.flops("decode") if self.tokenizer is not None else 0
        scale = self.spec.scale_at(schedule.final_k) if cfg_scale is None else cfg_scale
        grid = time_grid(self.spec.sample_steps, self.spec.timestep_shift)
        calls = self.spec.step_calls(scale, schedule.final_k)
        return float(sum(n * self.dit.flops(kk) for n, kk in zip(calls, schedule.ks_per_step(grid))) + decode)
