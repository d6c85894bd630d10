"""Stage-1 adversarial objective: a DINO-feature discriminator, hinge losses and LeCam regularisation.

Letters: B batch, D backbone width, P backbone patches, L feature layers read, H/W image size.

The discriminator is the "DINO discriminator" of StyleGAN-T and VAR that SoftVQ-VAE and the paper's
reference code train against: a frozen DINO ViT (`vlt.models.dino.DinoViT`, from a local weights file)
gives patch features at its embedding and after four evenly spaced blocks (2, 5, 8, 11 of 12), and one
small trainable head per layer (spectral-normalised 1D convolutions over the patch raster, batch
statistics over groups of 8 images, leaky ReLU, a residual kernel-9 conv) turns them into logits, one per
patch and layer. The backbone is held outside `state_dict` (never in a checkpoint, shared by deep
copies such as an EMA average); the heads and LeCam's running means are in `state_dict` and resume. The
module has no buffers (its running vectors are extra state), so DDP has nothing to broadcast per forward.

One training step (`AdversarialLoss`): the generator term -mean D(x_hat) with a fixed weight, or, with
`adaptive`, VQGAN's balance of last-layer gradient norms; the discriminator term
0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) plus `lecam` x the LeCam regulariser. Both are off
before `start` (the tokenizer's loss is then exactly the reconstruction loss). The two terms are summed
for one backward pass, and neither reaches the other's network: the generator term runs the heads with
their parameters out of autograd, the discriminator term sees detached images. Both gradients are those
of the same (tokenizer, discriminator) state, so one optimizer step equals the usual alternating pair
(tokenizer step, then discriminator step on the reconstructions made before it).
Left out of the reference recipe: DiffAugment and the consistency regulariser on augmented inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlt.models.align import frozen_params
from vlt.models.dino import DINO_SIZES, DinoSize, DinoViT


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 (mean relu(1 - real) + mean relu(1 + fake)); logits of any shape."""
    return 0.5 * (F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean())


def hinge_g_loss(fake: Tensor) -> Tensor:
    """Generator hinge loss: -mean(fake logits)."""
    return -fake.float().mean()


def adaptive_weight(recon_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's generator weight: ||d recon/d w|| / (||d g/d w|| + 1e-4) at the decoder's last weight w,
    clamped to [0, 1e4] and detached (the two terms then pull on w with equal strength)."""
    rec = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec.norm() / (adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al., 2021): mean relu(real - ema_fake)^2 + mean relu(ema_real - fake)^2.

    ema_real / ema_fake are exponential moving averages (decay `decay`, from 0) of the mean real and fake
    logits, updated in training mode before the term is computed (as the reference does), from this
    process's logits. They are the module's extra state: in its state_dict (so they checkpoint and
    resume) but not buffers (see `SNConv1d` for why).
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.ema = torch.zeros(2)  # (real, fake)

    @property
    def ema_real(self) -> Tensor:
        return self.ema[0]

    @property
    def ema_fake(self) -> Tensor:
        return self.ema[1]

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        """real, fake: logits of any shape -> scalar."""
        real, fake = real.float(), fake.float()
        if self.training:
            means = torch.stack([real.mean(), fake.mean()]).detach()
            self.ema = torch.lerp(self.ema.to(means.device), means, 1 - self.decay)
        ema = self.ema.to(real.device)
        return F.relu(real - ema[1]).square().mean() + F.relu(ema[0] - fake).square().mean()

    def get_extra_state(self) -> Tensor:
        return self.ema.detach().clone()  # a tensor, as every other state_dict value

    def set_extra_state(self, state: Tensor) -> None:
        self.ema = state.detach().clone()


class SNConv1d(nn.Conv1d):
    """A 1D conv whose weight is divided by its largest singular value (spectral normalisation, Miyato et
    al. 2018), estimated by one power iteration per training forward, with circular padding.

    The iteration vector u (out channels,) is extra state, not a buffer: DDP broadcasts module buffers
    at every forward, validation included, where ranks may see unequal batch counts (and would hang or
    crash). u starts from a fixed seed, so every process computes the same u from the same weights.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__(c_in, c_out, kernel, padding=kernel // 2, padding_mode="circular")
        self.u = F.normalize(torch.randn(c_out, generator=torch.Generator().manual_seed(0)), dim=0)

    def sigma(self) -> Tensor:
        """The weight's largest singular value (differentiable in the weight; u and v held fixed), in
        float32 also under autocast."""
        w = self.weight.flatten(1).float()  # (out, in * kernel)
        with torch.autocast(w.device.type, enabled=False):
            with torch.no_grad():
                u = self.u.to(w.device, torch.float32)
                v = F.normalize(w.T @ u, dim=0)
                if self.training:
                    u = F.normalize(w @ v, dim=0)
                    v = F.normalize(w.T @ u, dim=0)
                    self.u = u
            return u @ w @ v

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight / self.sigma(), self.bias)

    def get_extra_state(self) -> Tensor:
        return self.u.detach().clone()

    def set_extra_state(self, state: Tensor) -> None:
        self.u = state.detach().clone()


class LocalBatchNorm(nn.Module):
    """Per-channel normalisation with statistics over groups of `group` images and all positions, and
    a learned affine (VAR's local batch norm): no running statistics, the same in training and eval,
    nothing to synchronise between processes. x: (B, D, P) -> (B, D, P)."""

    def __init__(self, channels: int, *, group: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.group, self.eps = group, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        parts = []
        for chunk in x.float().split(self.group):  # (b, D, P), b <= group
            mean = chunk.mean(dim=(0, 2), keepdim=True)
            var = chunk.var(dim=(0, 2), keepdim=True, unbiased=False)
            parts.append((chunk - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(parts) * self.weight[:, None] + self.bias[:, None]


class DiscHead(nn.Module):
    """Features (B, D, P) -> logits (B, P): conv1 + norm + lrelu, a residual kernel-k block (scaled by
    1/sqrt 2), a conv1 to one channel."""

    def __init__(self, channels: int, *, kernel: int = 9, group: int = 8) -> None:
        super().__init__()

        def block(k: int) -> nn.Sequential:
            return nn.Sequential(
                SNConv1d(channels, channels, k), LocalBatchNorm(channels, group=group), nn.LeakyReLU(0.2)
            )

        self.inp, self.res, self.out = block(1), block(kernel), SNConv1d(channels, 1, 1)

    def forward(self, f: Tensor) -> Tensor:
        h = self.inp(f)  # (B, D, P)
        h = (h + self.res(h)) / math.sqrt(2)  # (B, D, P)
        return self.out(h)[:, 0]  # (B, P)


def read_layers(depth: int, n: int = 4) -> tuple[int, ...]:
    """The embedding (-1) and n evenly spaced blocks ending with the last: (-1, 2, 5, 8, 11) for depth 12."""
    return tuple(sorted({-1, *((i + 1) * depth // n - 1 for i in range(n))}))


class _Shared:
    """Holds a module outside its owner's parameters and state_dict; deep copies share it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class DinoDiscriminator(nn.Module):
    """Frozen DINO backbone + one trainable `DiscHead` per read layer. images (B, 3, H, W) -> (B, L*P).

    Args:
        backbone: the frozen `DinoViT` (held outside this module's parameters and state_dict; it moves to
            the input's device on first use).
        kernel: kernel size of the heads' residual conv.
        group: images per batch-statistics group in the heads.
    """

    def __init__(self, backbone: DinoViT, *, kernel: int = 9, group: int = 8) -> None:
        super().__init__()
        self._backbone = _Shared(backbone.requires_grad_(False).eval())
        self.layers = read_layers(len(backbone.blocks))
        self.heads = nn.ModuleList(DiscHead(backbone.width, kernel=kernel, group=group) for _ in self.layers)

    @property
    def backbone(self) -> DinoViT:
        return self._backbone.module

    def features(self, images: Tensor) -> list[Tensor]:
        """The backbone's (B, D, P) features at every read layer; gradients reach `images` only."""
        backbone = self.backbone
        if backbone.cls_token.device != images.device:
            backbone.to(images.device)
        return backbone(images, self.layers)

    def logits(self, features: list[Tensor]) -> Tensor:
        """Per-layer features -> (B, L*P) logits."""
        return torch.cat([head(f) for head, f in zip(self.heads, features, strict=True)], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.features(images))


def missing_disc_weights(weight: float, path: str | None, reason: str | None = None) -> str:
    where = "no file was given" if path is None else reason or f"{path} does not exist"
    return (
        f"adversarial loss weight {weight} needs a local discriminator backbone file, but {where}. Expected "
        "a torch state_dict of vlt.models.dino.DinoViT in the DINO/timm key layout (patch_embed.proj.*, "
        "cls_token, pos_embed, blocks.i.*): a released DINO or DINOv2 ViT such as "
        "dino_deitsmall16_pretrain.pth loads as it is, or write one with DinoViT.save; place it e.g. at "
        "weights/dino_deitsmall16_pretrain.pth and pass it as model.init_args.loss.disc_weights=<path>, with "
        "model.init_args.loss.disc_size its size (s or b); or set model.init_args.loss.adversarial=0."
    )


class AdversarialLoss(nn.Module):
    """The GAN terms of one stage-1 step; see the module docstring.

    Args:
        weight: generator weight (> 0).
        backbone_path: local `DinoViT` state dict (see `missing_disc_weights`).
        size: the backbone's `DINO_SIZES` name.
        image_size: side the images are resized to before the backbone.
        start: first global step with the adversarial terms (before it both are zero).
        lecam: weight of the LeCam regulariser in the discriminator loss (0: off).
        adaptive: scale the generator term by `adaptive_weight` (VQGAN) on top of `weight`; else fixed.
    """

    def __init__(
        self,
        *,
        weight: float,
        backbone_path: str | None,
        size: DinoSize = "s",
        image_size: int = 224,
        start: int = 0,
        lecam: float = 0.0,
        adaptive: bool = False,
    ) -> None:
        super().__init__()
        if weight <= 0 or start < 0 or lecam < 0:
            raise ValueError(
                f"adversarial weight must be > 0, start and lecam >= 0: {weight}, {start}, {lecam}"
            )
        if size not in DINO_SIZES:
            raise ValueError(f"unknown discriminator size {size!r}; choose one of {tuple(DINO_SIZES)}")
        if backbone_path is None or not Path(backbone_path).is_file():
            raise ValueError(missing_disc_weights(weight, backbone_path))
        try:
            backbone = DinoViT.from_file(backbone_path, size=size, image_size=image_size)
        except Exception as exc:  # unreadable, another layout or another size: same guidance, with the reason
            raise ValueError(
                missing_disc_weights(weight, backbone_path, f"{backbone_path} is unusable ({exc})")
            ) from exc
        self.weight, self.start, self.lecam_weight, self.adaptive = weight, start, lecam, adaptive
        self.disc = DinoDiscriminator(backbone)
        self.lecam = LeCam()

    def forward(
        self, images: Tensor, recon: Tensor, recon_loss: Tensor, *, step: int, last_layer: Tensor | None
    ) -> dict[str, Tensor]:
        """images, recon (B, 3, H, W); recon_loss the tokenizer's other terms (for the adaptive weight).

        Returns:
            adv_g: the weighted generator term to add to the tokenizer's loss; adv_weight: its weight;
            disc_loss: the discriminator's loss; after `start` also disc_real, disc_fake (mean logits)
            and disc_lecam (the unweighted regulariser).
        """
        if step < self.start:
            # Zero, but every head parameter stays in the graph: DDP's reducer expects them all.
            zero = sum((p.sum() for p in self.parameters()), recon_loss.new_zeros(())) * 0.0
            return {
                "adv_g": recon_loss.new_zeros(()),
                "adv_weight": recon_loss.new_zeros(()),
                "disc_loss": zero,
            }
        fake_features = self.disc.features(recon)  # graph to the tokenizer
        with frozen_params(self.disc):  # the generator term never trains the heads
            g_loss = hinge_g_loss(self.disc.logits(fake_features))
        weight = torch.as_tensor(self.weight, device=g_loss.device)
        if self.adaptive and last_layer is not None:
            weight = weight * adaptive_weight(recon_loss, g_loss, last_layer)
        with torch.no_grad():
            real_features = self.disc.features(images.detach())
        real = self.disc.logits(real_features)
        fake = self.disc.logits([f.detach() for f in fake_features])
        reg = self.lecam(real, fake)
        d_loss = hinge_d_loss(real, fake) + self.lecam_weight * reg
        return {
            "adv_g": weight * g_loss, "adv_weight": weight, "disc_loss": d_loss,
            "disc_real": real.detach().float().mean(), "disc_fake": fake.detach().float().mean(),
            "disc_lecam": reg.detach(),
        }  # fmt: skip
