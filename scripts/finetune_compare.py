"""Does stage 3 pay? Before / after the joint fine-tune against stage 2 simply trained longer.

    .venv/bin/python scripts/finetune_compare.py [--joint runs/joint-tiny] [--dit runs/dit-tiny/...]

`make finetune` runs it after the joint fit. Generators, all from the same stage-2 checkpoint (`--dit`):

- before: that checkpoint;
- after: the joint fine-tune's export (`<joint>/export/generator`), S optimizer steps;
- stage 2 + S steps: the stage-2 run resumed from the checkpoint (its optimizer, schedule and EMA) for the
  joint's S optimizer steps on the cached latents, tokenizer untouched;
- stage 2 + equal time: the same, for as many steps as the joint's training wall time buys at the
  stage-2 run's measured step time (both read from the runs' TensorBoard events, one machine).

Every generator is scored the same way: 512 samples per K against the 512 synthetic val images, no
guidance (w = 1, the guidance sweep's choice), the vltnet scores, one evaluation per noise seed (the same
seeds for every generator); tables give mean ± 95% t-interval over seeds and Welch's test of "after"
against each other row. Finished runs and evaluations are reused unless --fresh.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KS = [4, 8, 16, 32]
SCORES = {
    "gfd_vltnet": "fd_vltnet (lower is better)",
    "gclass_acc_vltnet": "class accuracy (higher is better)",
}
NUM_IMAGES = 512


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--joint", default="runs/joint-tiny", help="the joint fine-tune's run directory")
    parser.add_argument("--dit", default="runs/dit-tiny/checkpoints/last.ckpt", help="its stage-2 start")
    parser.add_argument(
        "--dit-config",
        default=None,
        help="config of the resumed stage-2 run (default: the start run's config.yaml)",
    )
    parser.add_argument("--out", default="runs/finetune-compare")
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per generator")
    parser.add_argument("--fresh", action="store_true")
    return parser.parse_args()


def train_seconds(run: Path) -> tuple[float, int]:
    """(wall seconds between the first and last logged train/loss, steps between them) of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in sorted(run.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            events += acc.Scalars("train/loss")
    if len(events) < 2:
        raise SystemExit(f"{run} logged fewer than two train/loss points: no step time to read")
    events.sort(key=lambda e: e.step)
    return events[-1].wall_time - events[0].wall_time, events[-1].step - events[0].step


def longer(args, name: str, start: Path, steps: int) -> Path:
    """The stage-2 run resumed from `start` for `steps` more optimizer steps (reused when done)."""
    import torch

    run = ROOT / args.out / "runs" / name
    ckpt = run / "checkpoints" / "last.ckpt"
    begin = int(torch.load(start, map_location="cpu", weights_only=False)["global_step"])
    if ckpt.exists() and not args.fresh:
        done = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        if done == begin + steps:
            return ckpt
    shutil.rmtree(run, ignore_errors=True)
    config = args.dit_config or start.parents[1] / "config.yaml"  # <run>/checkpoints/last.ckpt
    cmd = [
        sys.executable, "-m", "vlt.cli", "fit", "-c", str(config), f"--runs_dir={run.parent}",
        f"--name={name}", f"--ckpt_path={start}", f"--trainer.max_steps={begin + steps}",
    ]  # fmt: skip
    if args.dit_config is None:  # a saved config.yaml pins its own run's directory and logger
        cmd += [
            f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run.parent}",
            f"--trainer.logger.init_args.name={name}",
        ]  # fmt: skip
    print("$ vlt " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return ckpt


def evaluate(args, name: str, source: Path) -> list[list[dict]]:
    """One row list per noise seed (cached in <out>/<name>.json)."""
    path = ROOT / args.out / f"{name}.json"
    if path.exists() and not args.fresh:
        return json.loads(path.read_text())
    import vlt
    from vlt.metrics.budget import BudgetEvaluator

    images, labels = real_images()
    generator = vlt.load(str(source)).eval()
    per_seed = []
    for seed in range(args.seeds):
        print(f"evaluating {name}, noise seed {seed}", flush=True)
        evaluator = BudgetEvaluator(
            ks=KS, metrics=["gfid"], cfg_scales=[1.0], num_images=NUM_IMAGES, batch_size=128,
            extractor="proxy", cache_dir=str(ROOT / "runs" / ".fid_cache"), dataset_id="synthetic-val",
            resolution=32, feature_net=str(ROOT / "data" / "features"),
            feature_scores=["fd", "kid", "class_acc"], seed=seed, replicates=0,
        )  # fmt: skip
        per_seed.append(evaluator.evaluate_generator(generator, images, labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(per_seed))
    return per_seed


@functools.cache
def real_images():
    """The first NUM_IMAGES synthetic val images and their labels, read once on first use."""
    import torch

    from vlt.metrics.budget.data import read_shard_images

    images, labels = read_shard_images(str(ROOT / "data/synthetic/shards/val-*.tar"), NUM_IMAGES, 32, 128)
    return torch.cat(images), torch.cat(labels)


def values(per_seed: list[list[dict]], k: int, column: str) -> list[float]:
    return [float(r[column]) for rows in per_seed for r in rows if int(float(r["k"])) == k and r.get(column)]


def cell(v: list[float]) -> str:
    from vlt.metrics.intervals import t_interval

    if len(v) < 2:
        return f"{v[0]:.3f}" if v else "-"
    e = t_interval(v)
    return f"{e.mean:.3f} ± {e.half:.3f}"


def versus(a: list[float], b: list[float]) -> str:
    """a - b ± its 95% Welch half-width (p); `*` when p < 0.05."""
    from vlt.metrics.intervals import welch

    if len(a) < 2 or len(b) < 2:
        return "-"
    d, half, p = welch(a, b)
    return f"{d:+.3f} ± {half:.3f} (p={p:.2g}){' *' if p < 0.05 else ''}"


def table(rows: dict[str, list[list[dict]]], notes: dict[str, str]) -> list[str]:
    lines = []
    for column, what in SCORES.items():
        lines += [
            f"### {what}",
            "",
            "| generator | " + " | ".join(f"K={k}" for k in KS) + " |",
            "|---|" + "---|" * len(KS),
        ]
        for name, per_seed in rows.items():
            lines.append(
                f"| {name} ({notes[name]}) | "
                + " | ".join(cell(values(per_seed, k, column)) for k in KS)
                + " |"
            )
        after = rows["after"]
        for name, per_seed in rows.items():
            if name != "after":
                diffs = [versus(values(after, k, column), values(per_seed, k, column)) for k in KS]
                lines.append(f"| after − {name} | " + " | ".join(diffs) + " |")
        lines.append("")
    return lines


def main() -> None:
    import torch

    args = parse()
    joint, start = ROOT / args.joint, ROOT / args.dit
    joint_ckpt = joint / "checkpoints" / "last.ckpt"
    if not joint_ckpt.exists():
        raise SystemExit(f"no joint fine-tune at {joint} (run `make finetune` first)")
    steps = int(torch.load(joint_ckpt, map_location="cpu", weights_only=False)["global_step"])
    t_joint, n_joint = train_seconds(joint)
    plus = longer(args, f"stage2-plus{steps}", start, steps)
    t_dit, n_dit = train_seconds(plus.parents[1])
    equal = round(steps * (t_joint / n_joint) / (t_dit / n_dit))
    plus_time = longer(args, f"stage2-plus{equal}", start, equal)
    sources = {"before": start, "after": joint / "export" / "generator", "stage 2 + S steps": plus,
               "stage 2 + equal time": plus_time}  # fmt: skip
    notes = {
        "before": "the stage-2 start", "after": f"joint, S = {steps} steps",
        "stage 2 + S steps": f"+{steps} steps", "stage 2 + equal time": f"+{equal} steps",
    }  # fmt: skip
    rows = {
        name: evaluate(args, name.replace(" ", "-").replace("+", "plus"), src)
        for name, src in sources.items()
    }
    head = [
        f"## Stage 3 against stage 2 trained longer ({NUM_IMAGES} samples per K, w = 1, mean ± 95% "
        f"t-interval over {args.seeds} noise seeds; `scripts/finetune_compare.py`)",
        "",
        f"Joint step {t_joint / n_joint:.3f} s, stage-2 step {t_dit / n_dit:.3f} s (this machine, "
        f"TensorBoard wall times): the joint's {steps} steps cost as much as {equal} stage-2 steps. "
        "`*`: p < 0.05 (Welch).",
        "",
    ]
    lines = head + table(rows, notes)
    out = ROOT / args.out
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
