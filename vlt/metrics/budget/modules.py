"""What a budget evaluation calls: the `BudgetModule` protocol, its adapters for the stage objects,
and the context one evaluation shares between its fixed-K and adaptive rows.

Letters: B batch, H/W height/width, K tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from vlt.metrics.budget.scorer import SetScorer
from vlt.objectives.schedule import KSchedule

Task = Literal["reconstruct", "generate"]


class BudgetModule(Protocol):
    """What a model implements to be evaluated at token budgets (the Lightning stage modules do; the
    pure-torch stage objects through `TokenizerBudget` / `GeneratorBudget`).

    Reconstruction (psnr, rfid) needs `budget_reconstruct`, generation (gfid) `budget_generate`
    (and `budget_generate_adaptive` for adaptive budgets); all need `budget_flops` and `budget_tokens`.
    """

    def budget_reconstruct(self, images: Tensor, k: int) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> encode, merge to K tokens, decode -> (B, 3, H, W) in [-1, 1]."""
        ...

    def budget_generate(
        self, labels: Tensor, k: int, cfg_scale: float | None, generator: torch.Generator
    ) -> Tensor:
        """labels (B,) -> sample K tokens with guidance scale `cfg_scale` (None: the generator's own
        scale at K), decode -> (B, 3, H, W)."""
        ...

    def budget_flops(self, k: int, task: Task, cfg_scale: float | None) -> float:
        """Forward FLOPs per image of `task` at K (all sampling steps and guidance passes included)."""
        ...

    def budget_tokens(self, k: int) -> float:
        """Tokens per image at K: K itself for a fixed K, the mean over images in adaptive mode."""
        ...


class TokenizerBudget(nn.Module):
    """A `vlt.stages.VariableLengthTokenizer` as a reconstruction `BudgetModule`."""

    def __init__(self, tokenizer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def budget_reconstruct(self, images: Tensor, k: int) -> Tensor:
        return self.tokenizer.reconstruct(images, k)

    def budget_tokens(self, k: int) -> float:
        return float(k)

    def budget_flops(self, k: int, task: Task = "reconstruct", cfg_scale: float = 1.0) -> float:
        """Encode + decode: the decoder always sees N slots, so the cost does not fall with K."""
        return float(self.tokenizer.flops("reconstruct"))


class GeneratorBudget(nn.Module):
    """A `vlt.stages.LatentGenerator` as a generation `BudgetModule` (decoding with its tokenizer)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float | None, generator=None) -> Tensor:
        return self.generator.generate(labels, k, cfg_scale=cfg_scale, generator=generator)

    def budget_generate_adaptive(
        self, labels: Tensor, budget: float, cfg_scale: float | None, generator=None
    ):
        return self.generator.generate_adaptive(labels, budget, cfg_scale=cfg_scale, generator=generator)

    def budget_tokens(self, k: int) -> float:
        return float(k)

    def budget_flops(self, k: int, task: Task = "generate", cfg_scale: float | None = 1.0) -> float:
        """Every DiT call of the sampler (x2 with guidance, x2 for Heun) + one tokenizer decode."""
        return float(self.generator.flops(k, cfg_scale))


class CoarseToFineBudget(GeneratorBudget):
    """A `LatentGenerator` sampled coarse-to-fine (`vlt.objectives.schedule`) as a `BudgetModule`.

    Row K samples `schedule.capped(K)`: the schedule's phases up to K, so every row ends at its K.
    An adaptive budget decides each image's K while sampling (`LatentGenerator.generate_decided`) at
    flow time `at` with the rule `decider(budget)` (e.g. a `vlt.adaptive.coarse.CoarseDecider`), and
    reports the FLOPs each image cost.
    """

    def __init__(
        self,
        generator: nn.Module,
        schedule: KSchedule | str,
        *,
        at: float | None = None,
        decider: Callable[[float], Callable[[Tensor, Tensor], Tensor]] | None = None,
    ) -> None:
        super().__init__(generator)
        self.schedule, self.at, self.decider = generator.schedule(schedule), at, decider

    def budget_generate(self, labels: Tensor, k: int, cfg_scale: float | None, generator=None) -> Tensor:
        return self.generator.generate(
            labels, self.schedule.capped(k), cfg_scale=cfg_scale, generator=generator
        )

    def budget_generate_adaptive(
        self, labels: Tensor, budget: float, cfg_scale: float | None, generator=None
    ):
        if self.decider is None or self.at is None:
            raise ValueError(
                "adaptive budgets of a coarse-to-fine sampler need at=<decision time> and a decider"
            )
        rule = self.decider(budget)
        return self.generator.generate_decided(
            labels, self.schedule, rule, self.at, cfg_scale=cfg_scale, generator=generator
        )

    def budget_flops(self, k: int, task: Task = "generate", cfg_scale: float | None = 1.0) -> float:
        return float(self.generator.flops(self.schedule.capped(k), cfg_scale))


def module_device(model: Any) -> torch.device:
    """The device a model's inputs go to: its `device`, else its first parameter's, else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


@dataclass
class Run:
    """One evaluation: the model, its inputs (this rank's batches), the scorer and the row base.

    autocast: the context every model call runs in (a Trainer's precision context; none by default).
    """

    model: Any
    images: list[Tensor]
    labels: list[Tensor]
    scorer: SetScorer | None
    metrics: list[str]
    device: torch.device
    base: dict[str, Any] = field(default_factory=dict)
    autocast: Callable[[], AbstractContextManager] = nullcontext
    rank: int = 0
