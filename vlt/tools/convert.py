"""`vlt convert`: the reference implementation's released files as vlt export folders.

    vlt convert --out exports/lgm-xl --tokenizer tokenizer.pt --stats latents_stats.pt \
        --dit xl.pth --lora 32=lora_32.pth 128=lora_128.pth

writes `OUT/tokenizer` (from `--tokenizer`), `OUT/generator` (from `--dit`) and `OUT/lora_<K>/generator`
(one per LoRA file: each carries its own base weights), each loadable with `vlt.load`; the generators
carry the converted tokenizer when `--tokenizer` is given, so `vlt sample --dit OUT/generator` decodes
images. The generators' merge pattern is the merge table's (`--merge_table`) or, without one, the
tokenizer's (cut from its merge embeddings); with both they must agree. The converters and their key
mapping are in `vlt.stages.reference`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vlt import console
from vlt.models.pattern import MergePattern
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
    tokenizer_from_reference,
    tokenizer_state,
)
from vlt.stages.tokenizer import VariableLengthTokenizer


def _lora_files(specs: list[str]) -> dict[int, str]:
    """`K=PATH` pairs -> {K: PATH}."""
    out = {}
    for spec in specs:
        k, sep, path = spec.partition("=")
        if not sep or not k.strip().isdigit():
            raise ValueError(f"--lora takes K=PATH (e.g. 32=lora_32.pth), got {spec!r}")
        out[int(k)] = path
    return out


def _tokenizer(path: str, weights: str) -> tuple[VariableLengthTokenizer, str]:
    """The converted reference tokenizer and a line naming the training-only parts left out."""
    ckpt = read_reference(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    converted = tokenizer_from_reference(tokenizer_state(ckpt, weights=weights), args=args)
    dropped = ", ".join(f"{prefix.rstrip('.')} ({n} tensors)" for prefix, n in converted.dropped.items())
    return converted.tokenizer, dropped or "nothing"


def _generators(
    root: Path,
    *,
    pattern: MergePattern,
    stats: str,
    dit: str | None,
    lora: list[str],
    lora_alpha: float | None,
    weights: str,
    tok: VariableLengthTokenizer | None,
) -> list[Path]:
    """The base generator (`dit`) and one generator per LoRA file, exported under `root`."""
    mean_std = stats_from_reference(read_reference(stats))
    written = []
    if dit is not None:
        net = dit_from_reference(model_state(read_reference(dit), weights=weights))
        gen = generator_from_reference(net, pattern, mean_std, flow=PAPER_FLOW, tokenizer=tok)
        written.append(export(gen, root / "generator"))
    for k, path in _lora_files(lora).items():
        base, adapters = split_peft(model_state(read_reference(path), weights="model"), k)
        net = dit_from_reference(base, lora={k: adapters}, lora_alpha=lora_alpha)
        gen = generator_from_reference(net, pattern, mean_std, flow=LORA_FLOW, tokenizer=tok)
        written.append(export(gen, root / f"lora_{k}" / "generator"))
    return written


def convert(
    *,
    out: str,
    tokenizer: str | None = None,
    merge_table: str | None = None,
    stats: str | None = None,
    dit: str | None = None,
    lora: list[str] | None = None,
    lora_alpha: float | None = None,
    weights: Literal["ema", "model"] = "ema",
) -> list[Path]:
    """Convert the reference's tokenizer and generator checkpoints into vlt export folders.

    Args:
        out: output folder.
        tokenizer: the reference tokenizer checkpoint (`tokenizer.pt`); its `ema` weights unless
            weights="model". Its training-only parts (DINOv2 teacher, auxiliary decoder, ...) are left out.
        merge_table: the reference merge table (`ours2-d32.pt` of its `extract_features.py`); optional
            with --tokenizer (its merge embeddings give the same cuts).
        stats: `latents_stats.pt` of the reference latent data set (channel mean and std); needed
            for --dit and --lora.
        dit: the base generator checkpoint (`xl.pth`); its `model_ema` weights unless weights="model".
        lora: LoRA checkpoints as K=PATH (`32=lora_32.pth`): PEFT state dicts under `model`.
        lora_alpha: the adapters' alpha (None: alpha = rank, the reference's r = alpha = 32).
        weights: "ema" or "model" weights of `tokenizer` and `dit`.
    """
    if dit is None and not lora and tokenizer is None:
        raise ValueError("nothing to convert: give --tokenizer, --dit and/or --lora")
    if (dit is not None or lora) and (stats is None or (merge_table is None and tokenizer is None)):
        raise ValueError("--dit and --lora need --stats and a merge pattern: --merge_table or --tokenizer")
    root, written, numbers = Path(out), [], {}
    tok = None
    if tokenizer is not None:
        tok, numbers["dropped (training only)"] = _tokenizer(tokenizer, weights)
        written.append(export(tok, root / "tokenizer"))
    if dit is not None or lora:
        pattern = pattern_from_merge_table(read_reference(merge_table)) if merge_table else tok.pattern
        kw = {"dit": dit, "lora": lora or [], "lora_alpha": lora_alpha, "weights": weights, "tok": tok}
        written += _generators(root, pattern=pattern, stats=stats, **kw)
    files = [p.relative_to(root) for folder in written for p in sorted(folder.iterdir())]
    gens = [folder for folder in written if folder.name == "generator"]
    steps = [f"vlt sample --dit {folder} --k 32" for folder in gens[:1]] or [f"vlt.load('{written[0]}')"]
    console.summary("convert: reference files", where=root, files=files, numbers=numbers, next_steps=steps)
    return written
