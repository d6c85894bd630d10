"""Rectified flow on merged latents: pooled noise, size-weighted velocity loss, ODE samplers.

Letters: B batch, N latent slots, K merged tokens, C channels.

Convention: x_t = t * x1 + (1 - t) * eps, so t = 0 is pure noise and t = 1 is data; the velocity
target is dx_t/dt = x1 - eps and samplers integrate from t = 0 to t = 1.

The merged latent x1 = Gbar^T z is a view of the full N-slot latent z, so its noise must be the
same view of full-space noise: eps~ = Gbar^T eps with eps ~ N(0, I_N), i.e. token j has variance
1/m_j. Plain N(0, I_K) overstates the noise of big tokens by m_j and breaks the correspondence between
K levels. The loss weights token j by m_j K / N (weights sum to K): that is the full-space MSE of the
unmerged prediction, where token j's error counts once for each of its m_j slots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from vlt.models.merge_ops import merge
from vlt.objectives.guidance import guided_velocity, in_interval
from vlt.objectives.schedule import draw_split_noise, split_path, split_tokens

SAMPLERS = ("euler", "heun")


@dataclass
class FlowSpec:
    """Rectified-flow training and sampling settings.

    Args:
        t_mean, t_std: logit-normal training times (see `RectifiedFlow`).
        sample_steps, sampler: ODE steps and integrator ("euler" or "heun", two calls per step).
        timestep_shift: s of the sampler's time grid (see `time_grid`); 1 = uniform steps.
        cfg_scale: guidance weight w (1 = none); the per-token scale is 1 + (w - 1)/m_j.
        cfg_scales: w per K (e.g. {32: 10.5, 64: 8.0, 128: 6.5}); a K not listed uses `cfg_scale`.
        cfg_interval: guide only for t in [lo, hi] (None: every step).
        split_prob: share of stage-2 training samples drawn as states of a coarse-to-fine sampler
            that split its tokens at a time s < min(t, split_max_t) (`vlt.objectives.schedule`): what
            a DiT needs to fill in the detail after a split. 0 = plain flow matching.
        split_max_t: latest split time trained for (the target grows as s / (1 - s)).
        split_detail: sigma of a coarse-to-fine sampler's splits: the prior std of the data detail a
            split does not know (`vlt.objectives.schedule.split_tokens`; 0: children start at the
            parent's mean, 1: the normalised latents' unit variance).
        noise: starting noise of the sampler: "pooled" (Gbar^T eps, variance 1/m_j: what vlt trains
            with) or "plain" (N(0, I_K): the reference's `legacy_sampling`, for its LoRA files).
        guidance: "per_position" (scale 1 + (w - 1)/m_j per token) or "uniform" (w everywhere: the
            reference's `cfg_rescale_mode=none`, also legacy).
    """

    t_mean: float = 0.0
    t_std: float = 1.0
    sample_steps: int = 25
    sampler: Literal["euler", "heun"] = "euler"
    timestep_shift: float = 1.0
    cfg_scale: float = 1.5
    cfg_scales: dict[int, float] | None = None
    cfg_interval: tuple[float, float] | None = None
    split_prob: float = 0.0
    split_max_t: float = 0.7
    split_detail: float = 1.0
    noise: Literal["pooled", "plain"] = "pooled"
    guidance: Literal["per_position", "uniform"] = "per_position"

    def __post_init__(self) -> None:
        if self.noise not in ("pooled", "plain") or self.guidance not in ("per_position", "uniform"):
            raise ValueError(
                f"noise must be 'pooled' or 'plain' and guidance 'per_position' or 'uniform', got "
                f"{self.noise!r}, {self.guidance!r}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if not 0 <= self.split_prob <= 1 or not 0 < self.split_max_t < 1 or self.split_detail < 0:
            raise ValueError(
                f"need 0 <= split_prob <= 1, 0 < split_max_t < 1 and split_detail >= 0, got split_prob="
                f"{self.split_prob}, split_max_t={self.split_max_t}, split_detail={self.split_detail}"
            )
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be positive, got {self.timestep_shift}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.cfg_scales is not None:  # YAML and JSON may give the keys as strings
            self.cfg_scales = {int(k): float(w) for k, w in self.cfg_scales.items()}

    def scale_at(self, k: int | None) -> float:
        """The guidance weight w used at K tokens: `cfg_scales[K]`, else `cfg_scale`."""
        if self.cfg_scales is not None and k is not None and int(k) in self.cfg_scales:
            return float(self.cfg_scales[int(k)])
        return self.cfg_scale

    def model_calls(self, cfg_scale: float | None = None, k: int | None = None) -> int:
        """Velocity-network calls per image of one sample: one per evaluation time (two per step for
        Heun), plus one more wherever guidance is on (w != 1 and t inside `cfg_interval`)."""
        return sum(self.step_calls(cfg_scale, k))

    def step_calls(self, cfg_scale: float | None = None, k: int | None = None) -> list[int]:
        """`model_calls` of each sampler step, in order (a K schedule prices each step at its own K)."""
        scale = self.scale_at(k) if cfg_scale is None else cfg_scale
        grid = time_grid(self.sample_steps, self.timestep_shift)
        calls = []
        for t0, t1 in pairwise(grid):
            times = torch.tensor([t0, t1] if self.sampler == "heun" else [t0])
            guided = 0 if scale == 1.0 else int(in_interval(times, self.cfg_interval).sum())
            calls.append(len(times) + guided)
        return calls


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """The sampler's `steps + 1` flow times from 0 (noise) to 1 (data).

    t_i = i / steps, warped by the timestep shift t' = s t / (1 + (s - 1) t). This is the shift of the
    reference's LightningDiT sampler (`transport/integrators.py`, class `ode`), which samples with
    s = 0.3 on linspace(0, 1, 25); s < 1 puts more steps at high noise. In noise-level terms
    (sigma = 1 - t) it is SD3's shift sigma' = S sigma / (1 + (S - 1) sigma) with S = 1 / s.
    s = 1 gives the uniform grid.
    """
    if steps < 1 or shift <= 0:
        raise ValueError(f"need steps >= 1 and shift > 0, got steps={steps}, shift={shift}")
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return (shift * grid / (1 + (shift - 1) * grid)).tolist()


def pooled_noise(
    b: int, gbar: Tensor, c: int, generator: torch.Generator | None = None, eps: Tensor | None = None
) -> Tensor:
    """Gbar^T eps, eps ~ N(0, I_N) per channel. gbar: (N, K) or (B, N, K) -> (B, K, C), var 1/m_j.

    `eps` (B, N, C): full-space noise drawn by the caller (e.g. `indexed_noise`, one seed per image);
    None draws it here from `generator`."""
    if eps is None:
        # Drawn on the generator's device, so one seed gives the same noise whatever device gbar is on.
        device = generator.device if generator is not None else gbar.device
        eps = torch.randn(b, gbar.shape[-2], c, generator=generator, device=device)  # (B, N, C)
    elif eps.shape[0] != b or eps.shape[-1] != c or eps.shape[1] != gbar.shape[-2]:
        raise ValueError(f"noise of shape {tuple(eps.shape)} for B={b}, N={gbar.shape[-2]}, C={c}")
    return merge(eps.to(gbar.device), gbar)  # (B, K, C)


def start_noise(
    b: int,
    gbar: Tensor,
    sizes: Tensor,
    c: int,
    generator: torch.Generator | None,
    eps: Tensor | None,
    kind: Literal["pooled", "plain"],
) -> Tensor:
    """The sampler's start (B, K, C): pooled noise (variance 1/m_j), or, for kind "plain", the same draw
    scaled by sqrt(m_j) to unit variance per token (N(0, I_K), the reference's legacy sampling)."""
    x = pooled_noise(b, gbar, c, generator, eps=eps)  # (B, K, C)
    return x * sizes.to(x).sqrt()[..., None] if kind == "plain" else x


def image_seed(seed: int, index: int, k: int | str) -> int:
    """A 63-bit seed that depends on (seed, global image index, K) only: hash-mixed, not seed + index,
    so neighbouring seeds do not share images shifted by one index."""
    digest = hashlib.blake2b(f"vlt-sample:{seed}:{k}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def indexed_noise(seed: int, indices: Sequence[int], k: int | str, n: int, c: int) -> Tensor:
    """Full-space noise eps (B, N, C) ~ N(0, I_N), image i's from its own CPU generator seeded with
    `image_seed(seed, i, k)`: an image's noise does not depend on its batch, rank or world size."""
    rows = [
        torch.randn(n, c, generator=torch.Generator().manual_seed(image_seed(seed, int(i), k)))
        for i in indices
    ]
    return torch.stack(rows)  # (B, N, C)


def token_weights(sizes: Tensor) -> Tensor:
    """Loss weights m_j K / N: sizes (K,) or (B, K) -> same shape, summing to K per image."""
    n = sizes.sum(dim=-1, keepdim=True)
    return sizes.float() * sizes.shape[-1] / n


class Level(NamedTuple):
    """One K of a sampler: column-normalised assignment gbar (N, K) (or (B, N, K) for a level that is
    never split) and sizes (K,) or (B, K)."""

    gbar: Tensor
    sizes: Tensor


class Guide(NamedTuple):
    """Classifier-free guidance of a sampler: weight w, t-interval (None: every step), null label
    (None: the model's), uniform (w on every token instead of 1 + (w - 1)/m_j; `FlowSpec.guidance`)."""

    scale: float = 1.0
    interval: tuple[float, float] | None = None
    null_label: int | None = None
    uniform: bool = False


class NoisyBatch(NamedTuple):
    """One draw of the training path: model input, time, noise and velocity target."""

    x_t: Tensor  # (B, K, C) t * x1 + (1 - t) * eps
    t: Tensor  # (B,) flow time
    eps: Tensor  # (B, K, C) pooled noise
    target: Tensor  # (B, K, C) velocity x1 - eps


class RectifiedFlow:
    """Training loss and samplers of a rectified flow; receives the velocity model at each call.

    Args:
        t_mean, t_std: logit-normal training-time distribution, t = sigmoid(N(t_mean, t_std^2));
            it concentrates training on the middle of the path, where velocity is hardest to predict.
    """

    def __init__(self, *, t_mean: float = 0.0, t_std: float = 1.0) -> None:
        if t_std <= 0:
            raise ValueError(f"t_std must be positive, got {t_std}")
        self.t_mean = t_mean
        self.t_std = t_std

    def sample_t(self, b: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """(B,) training times in (0, 1)."""
        z = torch.randn(b, generator=generator, device=device)
        return torch.sigmoid(z * self.t_std + self.t_mean)

    def training_losses(
        self, model: nn.Module, x1: Tensor, y: Tensor, gbar: Tensor, sizes: Tensor
    ) -> dict[str, Tensor]:
        """Velocity loss on clean merged latents.

        Args:
            model: model(x_t, t, y, gbar, sizes) -> (B, K, C) velocity.
            x1: (B, K, C) clean merged latents (normalised); y: (B,) labels.
            gbar: (N, K) or (B, N, K) column-normalised assignment; sizes: (K,) or (B, K).

        Returns:
            dict(loss = size-weighted MSE (the training objective), mse = unweighted MSE), scalars.
        """
        path = self.noisy(x1, gbar)
        return self.velocity_loss(model(path.x_t, path.t, y, gbar, sizes), path.target, sizes)

    def noisy(self, x1: Tensor, gbar: Tensor) -> NoisyBatch:
        """Draw pooled noise and t for clean merged latents x1 (B, K, C); gbar (N, K) or (B, N, K).

        Split from `training_losses` so a caller can run the model more than once on one draw
        (e.g. on a detached and a non-detached x_t); gradients flow from x_t to x1.
        """
        b, _, c = x1.shape
        eps = pooled_noise(b, gbar, c).to(x1)  # (B, K, C)
        t = self.sample_t(b, x1.device)  # (B,)
        tt = t[:, None, None].to(x1)
        x_t = tt * x1 + (1 - tt) * eps  # (B, K, C)
        return NoisyBatch(x_t=x_t, t=t, eps=eps, target=x1 - eps)

    def split_noisy(self, x1: Tensor, parent: Tensor, gbar: Tensor, prob: float, max_t: float) -> NoisyBatch:
        """`noisy`, with a share `prob` of the samples drawn as states of a sampler that split its
        tokens at s ~ U(0, min(t, max_t)) (`vlt.objectives.schedule.split_path`); parent (B, K, C):
        the fine tokens' parents' means at the coarse level the split came from."""
        path = self.noisy(x1, gbar)
        b = x1.shape[0]
        chosen = torch.rand(b, device=x1.device) < prob  # (B,)
        s = torch.rand(b, device=x1.device) * path.t.clamp(max=max_t) * chosen  # (B,) 0: no split
        x_t, target = split_path(x1, parent, path.eps, path.t, s)
        return NoisyBatch(x_t=x_t, t=path.t, eps=path.eps, target=target)

    @staticmethod
    def velocity_loss(v: Tensor, target: Tensor, sizes: Tensor) -> dict[str, Tensor]:
        """Size-weighted (loss) and plain (mse) velocity errors; v, target (B, K, C), sizes (K,) or (B, K)."""
        err = (v - target).float().pow(2)  # (B, K, C)
        w = token_weights(sizes).to(err)  # (K,) or (B, K)
        w = w[None, :, None] if w.ndim == 1 else w[..., None]
        return {"loss": (w * err).mean(), "mse": err.mean()}

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        *,
        y: Tensor,
        gbar: Tensor,
        sizes: Tensor,
        steps: int = 25,
        method: Literal["euler", "heun"] = "euler",
        shift: float = 1.0,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
        channels: int | None = None,
        null_label: int | None = None,
        noise: Tensor | None = None,
        noise_kind: Literal["pooled", "plain"] = "pooled",
        guidance: Literal["per_position", "uniform"] = "per_position",
    ) -> Tensor:
        """Integrate the ODE from pooled noise (t = 0) to data (t = 1) at one K.

        Args:
            model: the velocity model; put in eval mode for the call and restored afterwards.
            y: (B,) labels. gbar: (N, K) or (B, N, K); sizes: (K,) or (B, K).
            steps: ODE steps (Heun costs two model calls per step).
            shift: timestep shift of the time grid (`time_grid`; 1 = uniform).
            cfg_scale, cfg_interval: guidance weight w and the t-interval where it applies
                (see `vlt.objectives.guidance`).
            generator: makes the starting noise reproducible.
            noise: (B, N, C) full-space starting noise eps instead of drawing it from `generator`
                (pooled here as Gbar^T eps, like drawn noise; see `indexed_noise`).
            channels, null_label: default to `model.cfg.channels` and `model.null_label`.
            noise_kind, guidance: see `FlowSpec.noise` and `FlowSpec.guidance`.

        Returns:
            (B, K, C) merged latents (unmerge and decode them to get images).
        """
        k = gbar.shape[-1]
        return self.integrate(
            model, y=y, levels={k: Level(gbar, sizes)}, step_ks=[k] * steps, grid=time_grid(steps, shift),
            method=method, guide=Guide(cfg_scale, cfg_interval, null_label, guidance == "uniform"),
            generator=generator, channels=channels, noise=noise, noise_kind=noise_kind,
        )  # fmt: skip

    @torch.no_grad()
    def integrate(
        self, model: nn.Module, *, y: Tensor, levels: Mapping[int, Level], step_ks: Sequence[int],
        grid: Sequence[float], method: str = "euler", guide: Guide | None = None, x: Tensor | None = None,
        start: int = 0, stop: int | None = None, generator: torch.Generator | None = None,
        channels: int | None = None, noise: Tensor | None = None, split_noise: Sequence[Tensor] = (),
        noise_kind: Literal["pooled", "plain"] = "pooled", split_detail: float = 1.0,
    ) -> Tensor:  # fmt: skip
        """Steps `start`..`stop` of `grid`, step i at K = step_ks[i]; where K grows the state splits into
        the finer level's tokens (`vlt.objectives.schedule.split_tokens`, fresh noise from `split_noise`
        in order, then from `generator`). `x` (B, K, C) is the state at grid[start] (None: start noise
        of `noise_kind` at t = 0, from `noise` (B, N, C) or `generator`). Returns the state (B, K, C)
        at grid[stop]."""
        if method not in SAMPLERS:
            raise ValueError(f"unknown sampler {method!r}; choose one of {SAMPLERS}")
        stop = len(step_ks) if stop is None else stop
        guide = guide or Guide()
        guide = guide._replace(null_label=model.null_label if guide.null_label is None else guide.null_label)
        c = channels if channels is not None else model.cfg.channels
        fresh = iter(split_noise)
        was_training = model.training
        model.eval()
        try:
            if x is None:
                first = levels[step_ks[start]]
                x = start_noise(y.shape[0], first.gbar, first.sizes, c, generator, noise, noise_kind)
            for i in range(start, stop):
                t0, t1, k = grid[i], grid[i + 1], step_ks[i]
                if x.shape[1] != k:
                    eps = next(fresh, None)
                    if eps is None:
                        n = levels[k].gbar.shape[-2]
                        eps = draw_split_noise(x.shape[0], n, c, 1, generator, x.device)[0]
                    coarse, fine = levels[x.shape[1]].gbar.to(x), levels[k].gbar.to(x)
                    x = split_tokens(x, t0, coarse, fine, eps, split_detail)
                level = levels[k]
                v0 = self._velocity(model, x, t0, y, level.gbar, level.sizes, guide)  # (B, K, C)
                if method == "heun":
                    v1 = self._velocity(model, x + (t1 - t0) * v0, t1, y, level.gbar, level.sizes, guide)
                    v0 = 0.5 * (v0 + v1)
                x = x + (t1 - t0) * v0  # (B, K, C)
            return x
        finally:
            model.train(was_training)

    @staticmethod
    def _velocity(
        model: nn.Module, x: Tensor, t: float, y: Tensor, gbar: Tensor, sizes: Tensor, guide: Guide
    ) -> Tensor:
        tb = torch.full((x.shape[0],), t, device=x.device)  # (B,)
        if guide.scale == 1.0:
            return model(x, tb, y, gbar, sizes)
        scale, interval, null, uniform = guide
        return guided_velocity(
            model, x, tb, y, gbar, sizes, scale=scale, null_label=null, interval=interval, uniform=uniform
        )
