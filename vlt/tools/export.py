"""`vlt export CKPT OUT`: a stage checkpoint as export folders (config.json, model.safetensors, pattern.json).

    vlt export runs/tokenizer-tiny/checkpoints/last.ckpt exports/tokenizer-tiny
    vlt export runs/dit-tiny/checkpoints/last.ckpt exports/dit-tiny   # generator/ and tokenizer/

A stage-1 checkpoint gives one tokenizer folder; a stage-2 or joint checkpoint gives `OUT/generator`
(which decodes on its own) and `OUT/tokenizer` (its tokenizer, for `vlt cache-latents`).
"""

from __future__ import annotations

from pathlib import Path

from vlt import console
from vlt.stages import LatentGenerator, export, load


def export_checkpoint(ckpt: str, out: str) -> list[Path]:
    """Write the export folder(s) of a checkpoint (or re-export an export folder).

    Args:
        ckpt: a stage-1, stage-2 or joint checkpoint, or an export folder.
        out: output folder.
    """
    obj = load(ckpt)
    if isinstance(obj, LatentGenerator):
        written = [export(obj, Path(out) / "generator")]
        if obj.tokenizer is not None:
            written.append(export(obj.tokenizer, Path(out) / "tokenizer"))
    else:
        written = [export(obj, out)]
    root = Path(out)
    files = [p.relative_to(root) for folder in written for p in sorted(folder.iterdir())]
    steps = [f"python -c \"import vlt; print(vlt.load('{written[0]}'))\""]
    if isinstance(obj, LatentGenerator):
        steps.append(f"vlt sample --dit {written[0]}")
    console.summary(f"export: {ckpt}", where=root, files=files, next_steps=steps)
    return written
