"""The one place where budget evaluation talks to other ranks; without a process group, the identity.

Letters: B rows of this rank, T rows of all ranks, G columns.

Every reduction runs on the device the process group reduces on (CUDA for NCCL, the CPU otherwise), so
a notebook, a script and every DDP backend take the same code path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_device(device: torch.device) -> torch.device:
    """Where collectives run: `device` under NCCL, the CPU for gloo or a single process."""
    nccl = world()[1] > 1 and dist.get_backend() == "nccl"
    return device if nccl else torch.device("cpu")


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=reduce_device(device))
    if world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_max(value: float, device: torch.device) -> float:
    """Max of a float over ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=reduce_device(device))
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate (B, G) tensors of every rank (B may differ): (T, G) and this rank's first row.

    A rank with no rows may not know G (an exactly-once val split can leave it no sample): its (0, 0)
    comes back widened to the others' G. Rows travel as float64, so every rank sends one dtype.
    """
    if x.ndim != 2:
        raise ValueError(f"gather_rows takes (rows, columns) tensors, got shape {tuple(x.shape)}")
    rank, size = world()
    if size == 1:
        return x, 0
    parts = gather_all_tensors(x.to(reduce_device(x.device), torch.float64))  # uneven B handled there
    width = max(p.shape[1] for p in parts)
    parts = [p if len(p) else p.new_zeros(0, width) for p in parts]
    offset = sum(len(p) for p in parts[:rank])
    return torch.cat(parts).to(x.device, x.dtype), offset
