"""The `vlt` command: Lightning's subcommands plus vlt's own tools.

    vlt fit|validate|test|predict -c conf/<stage>/<preset>.yaml [--key=value ...]
    vlt data synthetic|photos|folder ...        build webdataset shards
    vlt cache-latents ... / vlt sample ... / vlt curves ...   (stage tools, where installed)
    vlt allocate --cache <latents> --budget <mean K> ...      per-image K over the nested grid

This is the only module that knows YAML exists. Config files are parsed by jsonargparse in
"omegaconf+" mode: `${...}` interpolations resolve after command-line overrides are applied.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jsonargparse
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vlt import runs

# Extra commands: name -> "module:function-or-list" resolved lazily, so `vlt fit` never imports them.
TOOLS: dict[str, str] = {
    "data": "vlt.data.builders:COMMANDS",
    "cache-latents": "vlt.data.latents:cache_latents",
    "sample": "vlt.sampling:sample",
    "curves": "vlt.callbacks.curves:curves",
    "allocate": "vlt.adaptive.command:allocate",
    "features": "vlt.metrics.features:features",
}


class VLTCLI(LightningCLI):
    """LightningCLI with vlt's defaults: omegaconf+ parsing, resumable config saving, a run name."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        # Relative paths inside configs resolve against the working directory, also under subcommands.
        jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(
            model_class=None,
            datamodule_class=None,
            parser_kwargs={"parser_mode": "omegaconf+"},
            # A requeued or resumed run rewrites its own config.yaml instead of crashing on it.
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            # Each LightningModule owns its optimizer and schedule (typed init args), so configs stay flat.
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Top-level keys used only for interpolation must be declared arguments.
        parser.add_argument("--name", type=str, default="run", help="Run name: outputs go to runs/<name>/")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent folder of run directories")
        parser.add_argument("--latents", type=str, default="", help="Latent cache folder (stage-2 configs)")
        parser.add_argument(
            "--imagenet", type=str, default="", help="Image shard folder (paper-scale configs)"
        )

    def before_instantiate_classes(self) -> None:
        """Give every run one fixed directory, runs_dir/name, unless the config sets its own.

        Fixed (no timestamps, no version_N) so a requeued or resumed job finds its checkpoints, TensorBoard
        events and config.yaml in the same place.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = str(Path(config.runs_dir) / config.name)
        trainer = config.trainer
        if trainer.default_root_dir is None:
            trainer.default_root_dir = run_dir
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": config.runs_dir, "name": config.name, "version": ""},
            }

    def before_fit(self) -> None:
        """Refuse to reuse a run directory by accident; a SLURM requeue resumes from its newest checkpoint."""
        init = self.config_init[self.subcommand]
        init["ckpt_path"] = runs.prepare_fit(self.trainer, ckpt_path=init.get("ckpt_path"))


def _resolve(spec: str) -> Callable | list[Callable]:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def _leading_paths(args: list[str]) -> int:
    """How many arguments before the first option."""
    for i, a in enumerate(args):
        if a.startswith("-"):
            return i
    return len(args)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        tool, rest = args[0], args[1:]
        if tool == "curves":  # `vlt curves RUN_DIR [RUN_DIR ...]`: leading paths become --runs
            paths = [a for a in rest if not a.startswith("-")][: _leading_paths(rest)]
            rest = ([f"--runs={json.dumps(paths)}"] if paths else []) + rest[len(paths) :]
        jsonargparse.CLI(_resolve(TOOLS[tool]), args=rest, prog=f"vlt {tool}", as_positional=False)
        return
    if args and args[0] in ("-h", "--help"):
        print(f"vlt tools (each has --help): {', '.join(TOOLS)}\n")
    VLTCLI(args=argv)


if __name__ == "__main__":
    main()
