"""Stage-1 comparison table: PSNR per K and merged-pair vs all-pair slot cosine, per checkpoint and val set.

    .venv/bin/python bench/tokenizer_eval.py \
        --ckpt runs/tokenizer-tiny/checkpoints/last.ckpt runs/tokenizer-tiny-nested/checkpoints/last.ckpt \
        --val 'data/synthetic/shards/val-*.tar' 'data/photos/shards/val-*.tar'

Runs `LitTokenizer`'s own validation (the weights in the checkpoint: EMA when EMA was on) and prints one
markdown table per val set.
"""

from __future__ import annotations

import argparse
import logging

import lightning as L

from vlt.data import WebDataModule
from vlt.lit import LitTokenizer


def evaluate(ckpt: str, val: str) -> dict[str, float]:
    model = LitTokenizer.load_from_checkpoint(ckpt, map_location="cpu")
    data = WebDataModule(
        val=val, image_size=model.tokenizer.cfg.image_size, val_batch_size=256, num_workers=0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.validate(model, datamodule=data, verbose=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", nargs="+", required=True)
    parser.add_argument("--val", nargs="+", required=True)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for val in args.val:
        results = {ckpt: evaluate(ckpt, val) for ckpt in args.ckpt}
        ks = sorted(
            {int(key.split("@k")[1]) for r in results.values() for key in r if key.startswith("val/psnr@k")}
        )
        print(f"\n{val}\n")
        print(
            "| checkpoint | "
            + " | ".join(f"PSNR K={k}" for k in ks)
            + " | merged cos K="
            + "/".join(str(k) for k in ks[:-1])
            + " | all-pair cos |"
        )
        print("|---" * (len(ks) + 3) + "|")
        for ckpt, r in results.items():
            merged = "/".join(
                f"{r[f'val/merged_cos@k{k}']:.3f}" if f"val/merged_cos@k{k}" in r else "-" for k in ks[:-1]
            )
            psnr = " | ".join(f"{r[f'val/psnr@k{k}']:.2f}" for k in ks)
            print(f"| {ckpt} | {psnr} | {merged} | {r['val/slot_cos']:.3f} |")


if __name__ == "__main__":
    main()
