"""Feature extractors of `vlt eval`: uint8 images (B, 3, H, W) in, `Features` (pool, spatial, logits) out.

Letters: B batch, H/W height/width, F pool features.

  * inception: torch-fidelity's FID Inception-v3 (the TF 2015 graph's weights) in one pass: the
    2048-d pool features, ADM's sFID features and the unbiased logits IS uses. torch-fidelity names
    no spatial output, so a forward hook reads them from the same network (see `SPATIAL_LAYER`).
  * vltnet: the project's trained feature net (`vlt.metrics.features`), pool features only.
  * proxy: the fixed random conv net (`vlt.metrics.fid.ProxyExtractor`), pool features only.
Each is built before any image is read, so a missing weights file fails at once, naming the file.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from vlt.metrics.features import DEFAULT_DIR, load_vltnet
from vlt.metrics.fid import ProxyExtractor, find_inception_weights
from vlt.metrics.generation import Features

FeatureKind = Literal["inception", "vltnet", "proxy"]
FEATURE_KINDS: tuple[str, ...] = ("inception", "vltnet", "proxy")
ADM_SPATIAL_CHANNELS = 7  # ADM's evaluator keeps `mixed_6/conv[..., :7]`: 17 * 17 * 7 = 2023 features
# The TF graph numbers its mixed blocks mixed, mixed_1 .. mixed_10 = torchvision's Mixed_5b, 5c, 5d, 6a,
# 6b, 6c, 6d, ...: mixed_6 is Mixed_6d, and its `conv` (no tower prefix) is the 1x1 branch, taken after
# its batch norm and ReLU as the graph's `mixed_6/conv:0` tensor is. (B, 192, 17, 17).
SPATIAL_LAYER = ("Mixed_6d", "branch1x1")
OFFLINE_HINT = (
    "Offline, evaluate with --features vltnet (the project's trained feature net) or --features proxy; "
    "their numbers are named fd_vltnet / fd_proxy, not FID."
)


def _inception_class(path: str) -> type[nn.Module]:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ValueError(
            f"--features inception needs torch-fidelity for the Inception-v3 network (weights found at "
            f"{path}): `pip install vlt[fid]` where a torchvision matching this torch exists. {OFFLINE_HINT}"
        ) from err
    return FeatureExtractorInceptionV3


class InceptionFeatures(nn.Module):
    """FID Inception-v3: pool (B, 2048), spatial (B, 2023) in ADM's NHWC order, logits (B, 1008)."""

    kind = "inception"

    def __init__(self, *, weights: str | None = None) -> None:
        super().__init__()
        try:
            path = str(find_inception_weights(weights))
        except ValueError as err:
            raise ValueError(f"vlt eval --features inception: {err} {OFFLINE_HINT}") from None
        network = _inception_class(path)
        self.net = network(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
        )
        self.net.requires_grad_(False)
        block, branch = SPATIAL_LAYER
        if not hasattr(getattr(self.net, block, None), branch):
            raise ValueError(
                f"this torch-fidelity's FeatureExtractorInceptionV3 has no {block}.{branch} (the layer sFID "
                "reads): its layout changed; pin a torch-fidelity whose Inception has it"
            )
        getattr(getattr(self.net, block), branch).register_forward_hook(self._keep)
        self._spatial: Tensor | None = None
        self.name = "inception"

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._spatial = output  # (B, 192, 17, 17)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Features:
        """images: (B, 3, H, W) uint8 (the network resizes to 299 as the TF graph does)."""
        pool, logits = self.net(images)  # (B, 2048), (B, 1008)
        spatial = self._spatial[:, :ADM_SPATIAL_CHANNELS]  # (B, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(images), -1)  # (B, 2023), channels last as in TF
        return Features(pool.float(), spatial.float(), logits.float())


class PooledFeatures(nn.Module):
    """vltnet or the proxy net behind the same interface: uint8 -> [-1, 1] -> pool features (B, F)."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind, self.name = net, kind, net.name

    def train(self, mode: bool = True) -> PooledFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Features:
        return Features(self.net(images.float() / 127.5 - 1).float())  # (B, F)


def build_extractor(features: str, weights: str | None = None) -> nn.Module:
    """The extractor `features` names, its weights checked now (before any image is read)."""
    if features == "inception":
        return InceptionFeatures(weights=weights)
    if features == "vltnet":
        return PooledFeatures(load_vltnet(weights or DEFAULT_DIR), "vltnet")
    if features == "proxy":
        if weights is not None:
            raise ValueError("--weights is not used with --features proxy (a fixed seeded network); drop it")
        return PooledFeatures(ProxyExtractor(), "proxy")
    raise ValueError(f"--features {features!r} is not one of {FEATURE_KINDS}")
