"""Class labels against the classes a model or a data set has: one check, used wherever labels enter.

-1 means "unlabelled" (the unconditional branch); any other label must be in [0, num_classes). Labels
below -1 are refused per sample by the stream (`vlt.data.stream`); this check catches the labels that
parse but do not fit the model, before they reach a label embedding (an index error deep in a DiT
step) or the latent cache (which would hand them to every later stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

UNLABELLED = -1


def check_labels(
    labels: torch.Tensor | Sequence[int], num_classes: int | None, *, where: str, keys: Sequence[str] = ()
) -> None:
    """Raise a ValueError naming `where`, the bad labels (and their keys) and the fix.

    Args:
        labels: (B,) integer labels; -1 = unlabelled.
        num_classes: classes of the model or data set (None: nothing to check against).
        where: what is being checked, e.g. "latent cache of data/synthetic/shards/train-*.tar".
        keys: the samples' keys, to name the culprits.
    """
    if num_classes is None:
        return
    y = torch.as_tensor(labels).reshape(-1)
    bad = (y < UNLABELLED) | (y >= num_classes)
    if not bool(bad.any()):
        return
    idx = bad.nonzero().reshape(-1)[:5].tolist()
    named = ", ".join(f"{keys[i]}={int(y[i])}" if i < len(keys) else str(int(y[i])) for i in idx)
    raise ValueError(
        f"{where}: labels outside [0, {num_classes}) (and not -1 = unlabelled): {named}. The model "
        f"has {num_classes} classes: set model.init_args.dit.num_classes to at least {int(y.max()) + 1}, "
        "or fix the labels of these samples (.cls / json 'label')"
    )


def model_classes(module: Any) -> int | None:
    """Classes of a stage module's label embedding (its generator's DiT), or None without labels."""
    cfg = getattr(getattr(getattr(module, "generator", module), "dit", None), "cfg", None)
    return getattr(cfg, "num_classes", None)


def data_classes(info: dict[str, Any] | None) -> int | None:
    """Classes a shard set declares in its info.json ("classes": [...]), or None."""
    classes = (info or {}).get("classes")
    return len(classes) if isinstance(classes, list) and classes else None
