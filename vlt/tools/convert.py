"""`vlt convert`: the reference implementation's released generator files as vlt export folders.

    vlt convert --out exports/lgm-xl --merge_table ours2-d32.pt --stats latents_stats.pt \
        --dit xl.pth --lora 32=lora_32.pth 128=lora_128.pth

writes `OUT/generator` (from `--dit`) and `OUT/lora_<K>/generator` (one per LoRA file: each carries
its own base weights), each loadable with `vlt.load` and sampled with `vlt sample --dit`. The
converters and their key mapping are in `vlt.stages.reference`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vlt import console
from vlt.stages import export
from vlt.stages.reference import (
    LORA_FLOW,
    PAPER_FLOW,
    dit_from_reference,
    generator_from_reference,
    model_state,
    pattern_from_merge_table,
    read_reference,
    split_peft,
    stats_from_reference,
)


def _lora_files(specs: list[str]) -> dict[int, str]:
    """`K=PATH` pairs -> {K: PATH}."""
    out = {}
    for spec in specs:
        k, sep, path = spec.partition("=")
        if not sep or not k.strip().isdigit():
            raise ValueError(f"--lora takes K=PATH (e.g. 32=lora_32.pth), got {spec!r}")
        out[int(k)] = path
    return out


def convert(
    *,
    out: str,
    merge_table: str,
    stats: str,
    dit: str | None = None,
    lora: list[str] | None = None,
    lora_alpha: float | None = None,
    weights: Literal["ema", "model"] = "ema",
) -> list[Path]:
    """Convert the reference's generator checkpoints into vlt export folders.

    Args:
        out: output folder.
        merge_table: the reference merge table (`ours2-d32.pt` of its `extract_features.py`).
        stats: `latents_stats.pt` of the reference latent data set (channel mean and std).
        dit: the base generator checkpoint (`xl.pth`); its `model_ema` weights unless weights="model".
        lora: LoRA checkpoints as K=PATH (`32=lora_32.pth`): PEFT state dicts under `model`.
        lora_alpha: the adapters' alpha (None: alpha = rank, the reference's r = alpha = 32).
        weights: "ema" or "model" weights of `dit`.
    """
    if dit is None and not lora:
        raise ValueError("nothing to convert: give --dit and/or --lora")
    pattern = pattern_from_merge_table(read_reference(merge_table))
    mean_std = stats_from_reference(read_reference(stats))
    written = []
    if dit is not None:
        net = dit_from_reference(model_state(read_reference(dit), weights=weights))
        gen = generator_from_reference(net, pattern, mean_std, flow=PAPER_FLOW)
        written.append(export(gen, Path(out) / "generator"))
    for k, path in _lora_files(lora or []).items():
        base, adapters = split_peft(model_state(read_reference(path), weights="model"), k)
        net = dit_from_reference(base, lora={k: adapters}, lora_alpha=lora_alpha)
        gen = generator_from_reference(net, pattern, mean_std, flow=LORA_FLOW)
        written.append(export(gen, Path(out) / f"lora_{k}" / "generator"))
    root = Path(out)
    files = [p.relative_to(root) for folder in written for p in sorted(folder.iterdir())]
    steps = [f"vlt sample --dit {folder} --k 32" for folder in written[:1]]
    console.summary("convert: reference generator files", where=root, files=files, next_steps=steps)
    return written
