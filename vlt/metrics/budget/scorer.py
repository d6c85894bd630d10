"""Scores of one evaluated image set for the budget evaluator: features in, estimates out.

Letters: B batch, T images (all ranks), F features.

`SetScorer` holds the feature networks (the FID extractor: proxy or Inception; vltnet, the project's
trained feature net) and the real references (FID mean and covariance from the stats cache; vltnet
features of the real images). Per evaluated set it collects each rank's features batch by batch,
gathers them over ranks, and scores them with the pure functions of `vlt.metrics.scores`; every
value comes back as an `Estimate` with a bootstrap interval over the generated samples. Columns:
`rfid_proxy` / `gfid_proxy` (or `rfid` / `gfid` with Inception) and `<r|g><score>_vltnet`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vlt.metrics.budget.distributed import gather_rows
from vlt.metrics.fid import metric_name
from vlt.metrics.intervals import Estimate, bootstrap
from vlt.metrics.scores import FeatureSet, fd_to_features, score, sqrt_psd


@dataclass
class SetScorer:
    """Feature nets and real references of one evaluation (see the module docstring).

    fid_net / fid_real: the FID extractor and the real (mean (F,), covariance (F, F)), or None.
    vltnet / vltnet_real: the trained feature net and its real FeatureSet, or None.
    scores: vltnet scores (`vlt.metrics.scores.SCORES`); class_acc needs labels.
    """

    fid_net: nn.Module | None = None
    fid_real: tuple[Tensor, Tensor] | None = None
    fid_kind: str = "proxy"
    vltnet: nn.Module | None = None
    vltnet_real: FeatureSet | None = None
    scores: list[str] = field(default_factory=list)
    replicates: int = 200
    confidence: float = 0.95
    seed: int = 0
    _parts: dict[str, list[Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fid_real is not None:
            mu, cov = (t.double().cpu() for t in self.fid_real)
            self._fid_moments = (mu, sqrt_psd(cov), float(cov.trace()))

    def start(self) -> None:
        self._parts = {"fid": [], "vlt": [], "logits": [], "labels": []}

    def add(self, images: Tensor, labels: Tensor | None = None) -> None:
        """One batch (B, 3, H, W) in [-1, 1] of the evaluated set, with its class labels if known."""
        images = images.float().clamp(-1, 1)
        if self.fid_net is not None:
            self._parts["fid"].append(self.fid_net(images).double())
        if self.vltnet is not None:
            embedding = self.vltnet.embed(images)  # (B, F)
            self._parts["vlt"].append(((embedding - self.vltnet.shift) / self.vltnet.scale).double())
            self._parts["logits"].append(self.vltnet.head["hue"](embedding).double())
            if labels is not None:
                self._parts["labels"].append(labels.to(images.device).double())

    def _gathered(self, name: str) -> Tensor:
        local = torch.cat(self._parts[name]).cpu() if self._parts[name] else torch.zeros(0, 1)
        return gather_rows(local if local.ndim == 2 else local[:, None])[0]

    def finish(self, stage: str) -> dict[str, Estimate]:
        """Scores of the set since `start()`, named for `stage` "r" (reconstruction) or "g" (generation)."""
        out: dict[str, Estimate] = {}
        if self.fid_net is not None and self.fid_real is not None:
            fake = self._gathered("fid")
            fd = lambda ri, fi: {"fd": fd_to_features(*self._fid_moments, fake[fi])}
            estimate = bootstrap(
                fd, 1, len(fake), replicates=self.replicates, confidence=self.confidence, seed=self.seed
            )["fd"]
            out[metric_name(f"{stage}fid", self.fid_kind)] = estimate
        if self.vltnet is not None and self.vltnet_real is not None and self.scores:
            fake = FeatureSet(self._gathered("vlt"), self._gathered("logits"))
            scores = list(self.scores)
            if self._parts["labels"]:
                fake.labels = self._gathered("labels")[:, 0].long()
            elif "class_acc" in scores:
                scores.remove("class_acc")
            estimates = score(
                self.vltnet_real, fake, scores, replicates=self.replicates, confidence=self.confidence,
                seed=self.seed,
            )  # fmt: skip
            out.update({f"{stage}{name}_vltnet": value for name, value in estimates.items()})
        return out


def columns(values: dict[str, Estimate], suffix: str = "") -> dict[str, float]:
    """CSV/JSON columns: `<name><suffix>` = mean and `<name><suffix>_ci` = interval half-width."""
    out = {}
    for name, estimate in values.items():
        out[f"{name}{suffix}"] = estimate.mean
        if estimate.method != "subsets" and estimate.half == estimate.half:  # NaN: no interval
            out[f"{name}{suffix}_ci"] = estimate.half
    return out


def scalar_name(column: str, tag: str) -> str:
    """TensorBoard name of a curve column at `tag` (k4, adaptive_b8, ...): the guidance scale and the
    interval suffix move behind the tag, `gfid_proxy_w1.5_ci` -> `budget/gfid_proxy_ci@k4_w1.5`."""
    interval = column.endswith("_ci")
    base, _, scale = (column[:-3] if interval else column).partition("_w")
    return f"budget/{base}{'_ci' if interval else ''}@{tag}" + (f"_w{scale}" if scale else "")
