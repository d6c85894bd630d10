"""`vlt fit|validate`: Lightning's CLI with vlt's defaults (imported only for those commands).

Config files are parsed by jsonargparse in "omegaconf+" mode: `${...}` interpolations resolve after
command-line overrides are applied. What a person sees is set here too: Lightning's progress bar on a
terminal, one status line per interval on a pipe (`vlt.callbacks.progress`), the known-harmless
third-party noise filtered (`vlt.console`), and a summary with the next command after `fit`.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vlt import console, runs
from vlt.callbacks.progress import ProgressLines, by_k, headline
from vlt.checkpoints import load_checkpoint
from vlt.models.registry import expand_presets
from vlt.paths import check_name

# Model init args that name a checkpoint file, and the stage that file must be.
CHECKPOINT_ARGS: dict[str, str] = {
    "tokenizer": "tokenizer",
    "init_from_tokenizer": "tokenizer",
    "init_from_dit": "dit",
}
# Lightning's subcommands that vlt's stages support: none has a test_step or predict_step, so `test` and
# `predict` are not offered (vlt.cli refuses them with a message; `vlt validate` evaluates a checkpoint).
SUBCOMMANDS: tuple[str, ...] = ("fit", "validate")
# The stage of each LightningModule, for `--ckpt_path`.
MODEL_STAGES: dict[str, str] = {"LitTokenizer": "tokenizer", "LitDiT": "dit", "LitJoint": "joint"}


class VLTCLI(LightningCLI):
    """LightningCLI with vlt's defaults: omegaconf+ parsing, resumable config saving, a run name."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        console.quiet_third_party()
        # Relative paths inside configs resolve against the working directory, also under subcommands.
        jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        load_presets_in_configs()
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

    def _parse_ckpt_path(self) -> None:
        """Keep the model config as the config gives it; `--ckpt_path FILE` only restores state.

        LightningCLI 2.6 re-parses the checkpoint's hyper-parameters into the model config when
        --ckpt_path names a file. vlt's hyper-parameters hold resolved objects (DiTConfig, FlowSpec,
        the sources' shapes) without a class_path, which that parser refuses ("Parsing of ckpt_path
        hyperparameters failed"), so every `vlt fit|validate --ckpt_path FILE` stopped there. The
        config (or a run's saved config.yaml) defines the model; `check_ckpt_path` checks the stage and
        loading the state checks the shapes.
        """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands less `test` and `predict` (no stage has their steps)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Top-level keys used only for interpolation must be declared arguments.
        parser.add_argument("--name", type=str, default="run", help="Run name: outputs go to runs/<name>/")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Parent folder of run directories")
        parser.add_argument("--latents", type=str, default="", help="Latent cache folder (stage-2 configs)")
        parser.add_argument(
            "--imagenet", type=str, default="", help="Image shard folder (paper-scale configs)"
        )

    def before_instantiate_classes(self) -> None:
        """Give every run one fixed directory, runs_dir/name, unless the config sets its own, and let the
        model read the shapes its sources define (`resolve_sources`: the cache's pattern, the stage
        checkpoints' configs), so its constructor does no file I/O.

        Fixed (no timestamps, no version_N) so a requeued or resumed job finds its checkpoints, TensorBoard
        events and config.yaml in the same place.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = str(Path(config.runs_dir) / check_name(config.name, "--name"))
        check_checkpoint_args(config.get("model"))  # before any of those files is read
        resolve_model_sources(config)
        trainer = config.trainer
        if trainer.default_root_dir is None:
            trainer.default_root_dir = run_dir
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": config.runs_dir, "name": config.name, "version": ""},
            }
        # Lightning's bar on a terminal; on a pipe ProgressLines writes one line per interval. The model
        # summary table is replaced by ProgressLines' one line. A config's explicit choice wins.
        if trainer.enable_progress_bar is None:
            trainer.enable_progress_bar = console.is_terminal(sys.stdout) and not console.quiet()
        if trainer.enable_model_summary is None:
            trainer.enable_model_summary = False

    def before_fit(self) -> None:
        """Refuse to reuse a run directory by accident; a SLURM requeue resumes from its newest checkpoint."""
        init = self.config_init[self.subcommand]
        init["ckpt_path"] = runs.prepare_fit(self.trainer, ckpt_path=init.get("ckpt_path"))
        check_ckpt_path(init["ckpt_path"], self.model)
        if not console.quiet() and not any(isinstance(c, ProgressLines) for c in self.trainer.callbacks):
            # With the bar on, only the start, validation and end lines.
            every = float("inf") if self.trainer.progress_bar_callback is not None else None
            self.trainer.callbacks.append(ProgressLines(self.config[self.subcommand].name, every=every))
        self._fit_started = time.time()

    def after_fit(self) -> None:
        """The closing block: run directory, files written by this fit, headline numbers, next command."""
        if self.trainer.is_global_zero:
            fit_summary(self.trainer, self.model, self.config[self.subcommand].name, self._fit_started)

    def before_validate(self) -> None:
        check_ckpt_path(self.config_init[self.subcommand].get("ckpt_path"), self.model)


def load_presets_in_configs() -> None:
    """Config mappings that name a registry preset (`dit: {preset: s, num_classes: 1000}`) load as every
    field of the preset plus the listed ones (`vlt.models.registry.expand_presets`), before any parsing:
    `--print_config` and the saved config.yaml show the effective values, overrides merge as usual."""
    from jsonargparse._loaders_dumpers import set_omegaconf_loader  # the loader is made on first use

    set_omegaconf_loader("omegaconf+")
    base = jsonargparse.get_loader("omegaconf+")
    if getattr(base, "expands_presets", False):
        return

    def load(value: str) -> Any:
        return expand_presets(base(value))

    load.expands_presets = True  # type: ignore[attr-defined]
    jsonargparse.set_loader("omegaconf+", load, (yaml.YAMLError, ValueError))


def check_checkpoint_args(model: Any) -> None:
    """Every checkpoint a model's init args name loads safely and is of the stage its key needs."""
    init_args = (model.get("init_args") if hasattr(model, "get") else None) or {}
    for key, stage in CHECKPOINT_ARGS.items():
        value = init_args.get(key) if hasattr(init_args, "get") else None
        if isinstance(value, str) and value and not Path(value).is_dir():  # a folder: a safetensors export
            load_checkpoint(value, expect=stage, config_key=f"model.init_args.{key}")


def check_ckpt_path(path: str | None, model: Any) -> None:
    """`--ckpt_path` must be a checkpoint of the model's own stage (checked before any step runs)."""
    stage = MODEL_STAGES.get(type(model).__name__)
    if path and path not in ("last", "best", "hpc") and stage is not None:
        load_checkpoint(path, expect=stage, config_key="--ckpt_path")


def resolve_model_sources(config) -> None:
    """Fill the model's init args that its class reads from files (a `resolve_sources` classmethod)."""
    model = config.get("model")
    if model is None or not isinstance(model.get("class_path"), str):
        return
    module, _, name = model.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not hasattr(cls, "resolve_sources"):
        return
    init_args = model.init_args
    given = {key: init_args[key] for key in vars(init_args)}
    for key, value in cls.resolve_sources(given).items():
        if given.get(key) is None and value is not None:
            init_args[key] = _as_config_value(value)


def _as_config_value(value):
    """Dataclass values become Namespaces, as jsonargparse holds parsed dataclass arguments."""
    if dataclasses.is_dataclass(value):
        return jsonargparse.Namespace(**{f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return value


# What to run after each stage, as make targets (TOKENIZER=/DIT= point them at this run).
NEXT_STEPS: dict[str, list[str]] = {
    "tokenizer": ["make tensorboard", "make train-dit TOKENIZER={ckpt}"],
    "dit": ["make tensorboard", "make sample DIT={ckpt}", "make finetune DIT={ckpt}"],
    "joint": ["make tensorboard", "make sample DIT={run}/export/generator"],
}


def fit_summary(trainer: Any, model: Any, name: str, started: float) -> str:
    """Print the end-of-fit block (`vlt.console.summary`) and return it."""
    run_dir = Path(trainer.default_root_dir)
    written = sorted(
        (p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_mtime >= started - 1),
        key=lambda p: (len(p.parts), str(p)),
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    stage = MODEL_STAGES.get(type(model).__name__, "")
    steps = [s.format(ckpt=ckpt, run=run_dir) for s in NEXT_STEPS.get(stage, ["make tensorboard"])]
    return console.summary(
        f"fit {name}: done at step {trainer.global_step}",
        where=run_dir,
        files=[p.relative_to(run_dir) for p in written],
        numbers=by_k(headline(trainer.callback_metrics, limit=24)),
        next_steps=steps,
    )
