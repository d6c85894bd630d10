"""What moves stage 3? Variants of the joint fine-tune against its default, on the same start.

    .venv/bin/python scripts/finetune_study.py --variant "align0=--model.init_args.joint.align=0" \\
        --variant "dit-lr5e-4=--model.init_args.part_lr.dit=5e-4" [--train-seeds 1]

Each variant is the default joint run (`--joint`, whose saved config it starts from) with its CLI
overrides, at training seeds 0..T-1, scored like every generator of `scripts/finetune_compare.py`
(same noise seeds, same evaluations; that script's cached "before" and "after" rows are reused when it
ran first). The table gives fd_vltnet per K and each variant against the start ("before") and against
the default ("after"), paired: seed by seed over the shared noise seeds, and training seed t of a
variant with training seed t of the default (the same data order and merge noise). Written to
<out>/study.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_compare as fc

COLUMN = "gfd_vltnet"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--joint", default="runs/joint-tiny", help="the default joint fine-tune's run")
    parser.add_argument("--dit", default="runs/dit-tiny/checkpoints/last.ckpt", help="its stage-2 start")
    parser.add_argument("--out", default="runs/finetune-compare")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=OVERRIDES",
        help='a variant: its name, "=", then its `vlt fit` overrides (quote the whole)',
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per generator")
    parser.add_argument("--train-seeds", type=int, default=1, help="training seeds per variant")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    if not args.variant:
        parser.error('give at least one --variant "NAME=OVERRIDES"')
    bad = [v for v in args.variant if "=" not in v or not v.split("=", 1)[0]]
    if bad:
        example = '"align1=--model.init_args.joint.align=1"'
        parser.error(f'--variant takes "NAME=OVERRIDES", e.g. {example}; got {bad}')
    args.variant = [tuple(v.split("=", 1)) for v in args.variant]
    if "default" in {name for name, _ in args.variant}:
        parser.error("'default' names the joint run itself; give the variant another name")
    return args


def runs_of(args, joint: Path, name: str, overrides: list[str]) -> list[list[list[dict]]]:
    """[training seed][noise seed] evaluations of one variant; "default" is finetune_compare's own."""
    out = []
    for t in range(args.train_seeds):
        if name == "default":
            key, export = f"after-seed{t}", fc.joint_seed(args, joint, t)
        else:
            key = f"study-{name}-seed{t}"
            export = fc.joint_run(args, joint, key, [f"--seed_everything={t}", *overrides])
        out.append(fc.evaluate(args, key, export))
    return out


def training_noise(args, joint: Path, default: list[list[list[dict]]]) -> list[str]:
    """With one training seed per variant, what training noise alone moves: the default's other
    training seeds (those finetune_compare ran) against its seed 0, paired the same way."""
    lines, t = [], 1
    while args.train_seeds == 1 and (fc.seed_run(args, t) / "export").is_dir():
        other = [fc.evaluate(args, f"after-seed{t}", fc.joint_seed(args, joint, t))]
        pairs = ((fc.values(other, k, COLUMN), fc.values(default, k, COLUMN)) for k in fc.KS)
        diffs = " | ".join(fc.versus(a, b) for a, b in pairs)
        lines.append(f"| default, training seed {t} − seed 0 (training noise alone) | | {diffs} |")
        t += 1
    return lines


def main() -> None:
    args = parse()
    joint = fc.ROOT / args.joint
    if not (joint / "config.yaml").exists():
        raise SystemExit(f"no joint fine-tune at {joint} (run `make finetune` first)")
    before = [fc.evaluate(args, "before", fc.ROOT / args.dit)]
    rows = {"default": ("", runs_of(args, joint, "default", []))}
    for name, overrides in args.variant:
        rows[name] = (overrides, runs_of(args, joint, name, shlex.split(overrides)))
    lines = [
        f"## Stage-3 variants ({fc.NUM_IMAGES} samples per K, w = 1, fd_vltnet, lower is better; "
        "`scripts/finetune_study.py`)",
        "",
        f"Mean ± 95% t-interval over {args.seeds} noise seeds"
        + (f" (over {args.train_seeds} training seeds of their means)" if args.train_seeds > 1 else "")
        + "; differences paired as in `finetune_compare.py`; `*`: p < 0.05."
        + (
            " With one training seed the `*` tests the noise seeds only: a variant differs from the default "
            "only by more than the default's own training seeds differ (the training-noise rows)."
            if args.train_seeds == 1
            else ""
        ),
        "",
        "| variant | overrides | " + " | ".join(f"K={k}" for k in fc.KS) + " |",
        "|---|---|" + "---|" * len(fc.KS),
        "| before (the stage-2 start) | | "
        + " | ".join(fc.cell(fc.values(before, k, COLUMN)) for k in fc.KS)
        + " |",
    ]
    default = rows["default"][1]
    lines += training_noise(args, joint, default)
    for name, (overrides, runs) in rows.items():
        cells = " | ".join(fc.cell(fc.values(runs, k, COLUMN)) for k in fc.KS)
        lines.append(f"| {name} | `{overrides}` | {cells} |")
        for other, base in (("before", before), ("default", default)):
            if other != name:
                diffs = " | ".join(
                    fc.versus(fc.values(runs, k, COLUMN), fc.values(base, k, COLUMN)) for k in fc.KS
                )
                lines.append(f"| {name} − {other} | | {diffs} |")
    out = fc.ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
