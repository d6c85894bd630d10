"""What the tools on Lightning's predict loop share (`vlt sample`, `vlt cache-latents`): the Trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from vlt import console


def default_precision(accelerator: str) -> str:
    """bf16-mixed where a CUDA GPU with bf16 runs the job, else 32-true (CPU)."""
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def predict_trainer(name: str, callbacks: list, root: Path, **options):
    """A predict-only Trainer: Lightning's bar on a terminal, status lines on a pipe, no logger.

    Args:
        name: the command, at the start of each status line.
        callbacks: the prediction writer and any other callbacks.
        root: the output folder (Lightning's default_root_dir).
        options: accelerator, devices, num_nodes, precision (Lightning's Trainer arguments).
    """
    import lightning.pytorch as pl

    from vlt.callbacks.progress import PredictLines

    console.quiet_third_party()  # again: Lightning's log handlers exist only once it is imported
    bar = console.is_terminal() and not console.quiet()
    lines = [] if bar or console.quiet() else [PredictLines(name)]
    return pl.Trainer(
        **options,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        use_distributed_sampler=False,  # the data modules deal their work over the ranks themselves
        callbacks=[*callbacks, *lines],
        default_root_dir=root,
    )
