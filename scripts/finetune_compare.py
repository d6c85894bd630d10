"""Does stage 3 pay? Before / after the joint fine-tune against stage 2 simply trained longer.

    .venv/bin/python scripts/finetune_compare.py [--joint runs/joint-tiny] [--dit runs/dit-tiny/...]

`make finetune` runs it after the joint fit. Generators, all from the same stage-2 checkpoint (`--dit`):

- before: that checkpoint;
- after: the joint fine-tune's export (`<joint>/export/generator`), S optimizer steps, at training seeds
  0..T-1 (`--train-seeds`; seed 0 is `<joint>` itself, the others rerun its config at their seed);
- stage 2 + S steps: the stage-2 run resumed from the checkpoint (its optimizer, schedule and EMA) for the
  joint's S optimizer steps on the cached latents, tokenizer untouched;
- stage 2 + equal time: the same, for as many steps as the joint's training wall time buys at the
  stage-2 run's measured step time (both read from the runs' TensorBoard events, one machine).

Every generator is scored the same way: 512 samples per K against the 512 synthetic val images, no
guidance (w = 1, the guidance sweep's choice), the vltnet scores, one evaluation per noise seed (the same
seeds for every generator); tables give mean ± 95% t-interval over seeds and the paired t-test of
"after" against each other row: seed by seed for one joint run, over the runs' noise-seed means for T.
Finished runs and evaluations are reused while newer than their inputs, unless --fresh.
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
    parser.add_argument(
        "--train-seeds", type=int, default=3,
        help="joint fine-tunes at seeds 0..T-1 (0 is --joint itself; the others are run here)",
    )  # fmt: skip
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


def stamp(path: Path) -> float:
    """When a checkpoint file or an export folder was last written (its newest file)."""
    return max((p.stat().st_mtime for p in [path, *path.rglob("*")] if p.is_file()), default=0.0)


def longer(args, name: str, start: Path, steps: int) -> Path:
    """The stage-2 run resumed from `start` for `steps` more optimizer steps (reused when done)."""
    import torch

    run = ROOT / args.out / "runs" / name
    ckpt = run / "checkpoints" / "last.ckpt"
    begin = int(torch.load(start, map_location="cpu", weights_only=False)["global_step"])
    if ckpt.exists() and not args.fresh and stamp(ckpt) > stamp(start):
        done = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        if done == begin + steps:
            return ckpt
    config = args.dit_config or start.parents[1] / "config.yaml"  # <run>/checkpoints/last.ckpt
    fit(run, config, [f"--ckpt_path={start}", f"--trainer.max_steps={begin + steps}"],
        saved=args.dit_config is None)  # fmt: skip
    return ckpt


def joint_seed(args, joint: Path, seed: int) -> Path:
    """The joint fine-tune's generator export at training seed `seed`: the run itself for 0, else the
    run again at `seed_everything = seed` (`joint_run`)."""
    if seed == 0:
        return joint / "export" / "generator"
    return joint_run(args, joint, seed_run(args, seed).name, [f"--seed_everything={seed}"])


def seed_run(args, seed: int) -> Path:
    """The run directory of the joint fine-tune's training seed `seed` > 0."""
    return ROOT / args.out / "runs" / f"joint-seed{seed}"


def joint_run(args, joint: Path, name: str, extra: list[str]) -> Path:
    """The joint run's saved config again with the CLI arguments `extra`, its in-fit evaluations
    dropped (every generator is scored here), in <out>/runs/<name>: its generator export. Reused while
    it is newer than the joint run and was run with the same arguments."""
    import yaml

    run = ROOT / args.out / "runs" / name
    export, used = run / "export" / "generator", run.parent / f"{name}.args.json"
    fresh = export.exists() and stamp(export) > stamp(joint / "checkpoints" / "last.ckpt")
    if fresh and used.exists() and json.loads(used.read_text()) == extra and not args.fresh:
        return export
    config = yaml.safe_load((joint / "config.yaml").read_text())
    trainer = config["trainer"]
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if "TokenBudget" not in c["class_path"]]
    path = run.parent / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    fit(run, path, extra, saved=True)
    used.write_text(json.dumps(extra))
    return export


def fit(run: Path, config: Path, extra: list[str], *, saved: bool) -> None:
    """`vlt fit -c config` into the fresh run directory `run`; a `saved` config.yaml pins its own run's
    directory and logger, so those are pointed at `run` too."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "vlt.cli", "fit", "-c", str(config), f"--runs_dir={run.parent}",
           f"--name={run.name}", *extra]  # fmt: skip
    if saved:
        cmd += [
            f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run.parent}",
            f"--trainer.logger.init_args.name={run.name}",
        ]  # fmt: skip
    print("$ vlt " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def evaluate(args, name: str, source: Path) -> list[list[dict]]:
    """One row list per noise seed, cached in <out>/<name>.json while the source and seeds are the same
    (a new run at the same path is scored again)."""
    path = ROOT / args.out / f"{name}.json"
    key = {"source": str(source), "mtime": stamp(source), "seeds": args.seeds}
    if path.exists() and not args.fresh:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["per_seed"]
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
    path.write_text(json.dumps({"key": key, "per_seed": per_seed}))
    return per_seed


@functools.cache
def real_images():
    """The first NUM_IMAGES synthetic val images and their labels, read once on first use."""
    import torch

    from vlt.metrics.budget.data import read_shard_images

    images, labels = read_shard_images(str(ROOT / "data/synthetic/shards/val-*.tar"), NUM_IMAGES, 32, 128)
    return torch.cat(images), torch.cat(labels)


def values(runs: list[list[list[dict]]], k: int, column: str) -> list[list[float]]:
    """[training run][noise seed] values of one column at K."""
    return [
        [float(r[column]) for rows in per_seed for r in rows if int(float(r["k"])) == k and r.get(column)]
        for per_seed in runs
    ]


def means(v: list[list[float]]) -> list[float]:
    """The values to take an interval over: the noise seeds of one run, or each run's mean over them."""
    return v[0] if len(v) == 1 else [sum(x) / len(x) for x in v]


def cell(v: list[list[float]]) -> str:
    from vlt.metrics.intervals import t_interval

    x = means(v)
    if len(x) < 2:
        return f"{x[0]:.3f}" if x else "-"
    e = t_interval(x)
    return f"{e.mean:.3f} ± {e.half:.3f}"


def versus(a: list[list[float]], b: list[list[float]]) -> str:
    """mean a - mean b ± its 95% half-width (p); `*` when p < 0.05.

    Seed i draws the same noise for every generator (common random numbers), so differences are paired:
    one run against one run seed by seed; T training runs of `a` against one run of `b` as the T
    differences of their noise-seed means (the interval is over training seeds)."""
    from vlt.metrics.intervals import paired

    x, y = means(a), means(b)
    if len(a) > 1 and len(b) == 1:  # each run against the one run's mean over the same noise seeds
        y = [sum(b[0]) / len(b[0])] * len(x)
    if len(x) < 2 or len(x) != len(y):
        return "-"
    d, half, p = paired(x, y)
    return f"{d:+.3f} ± {half:.3f} (p={p:.2g}){' *' if p < 0.05 else ''}"


def table(rows: dict[str, list[list[list[dict]]]], notes: dict[str, str]) -> list[str]:
    """One table per score: a row per generator (rows[name]: its training runs' evaluations), then
    "after" against each other generator."""
    lines = []
    for column, what in SCORES.items():
        lines += [
            f"### {what}",
            "",
            "| generator | " + " | ".join(f"K={k}" for k in KS) + " |",
            "|---|" + "---|" * len(KS),
        ]
        for name, runs in rows.items():
            lines.append(
                f"| {name} ({notes[name]}) | " + " | ".join(cell(values(runs, k, column)) for k in KS) + " |"
            )
        after = rows["after"]
        for name, runs in rows.items():
            if not name.startswith("after"):
                diffs = [versus(values(after, k, column), values(runs, k, column)) for k in KS]
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
    afters = [evaluate(args, f"after-seed{t}", joint_seed(args, joint, t)) for t in range(args.train_seeds)]
    rows = {"before": [evaluate(args, "before", start)], "after": afters}
    notes = {"before": "the stage-2 start", "after": f"joint, S = {steps} steps"}
    if args.train_seeds > 1:
        notes["after"] += f", {args.train_seeds} training seeds"
        rows |= {f"after, training seed {t}": [runs] for t, runs in enumerate(afters)}
        notes |= {f"after, training seed {t}": f"{args.seeds} noise seeds" for t in range(args.train_seeds)}
    rows |= {"stage 2 + S steps": [evaluate(args, "stage-2-plusS", plus)],
             "stage 2 + equal time": [evaluate(args, "stage-2-plus-equal-time", plus_time)]}  # fmt: skip
    notes |= {"stage 2 + S steps": f"+{steps} steps", "stage 2 + equal time": f"+{equal} steps"}
    spread = f"over {args.seeds} noise seeds"
    if args.train_seeds > 1:
        spread += (
            f"; the after row's over its {args.train_seeds} joint training seeds (each the mean of its noise"
            " seeds), and so are its differences"
        )
    head = [
        f"## Stage 3 against stage 2 trained longer ({NUM_IMAGES} samples per K, w = 1; "
        f"`scripts/finetune_compare.py`)",
        "",
        f"Mean ± 95% t-interval {spread}. The start and the baselines are one training run each. Every "
        "generator draws the same noise at noise seed i, so differences are paired seed by seed; "
        "`*`: p < 0.05.",
        "",
        f"Joint step {t_joint / n_joint:.3f} s, stage-2 step {t_dit / n_dit:.3f} s (this machine, "
        f"TensorBoard wall times): the joint's {steps} steps cost as much as {equal} stage-2 steps.",
        "",
    ]
    lines = head + table(rows, notes)
    out = ROOT / args.out
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
