"""``python -m zoo fit --config experiments/X.yaml [--key=value ...]``: LightningCLI plus the zoo's run plumbing.

- unknown or misspelled keys stop the run before anything is built (jsonargparse), with close matches suggested;
- every run lives in ``runs/<name>/`` (name = the config's file stem unless ``--run.name`` is given): rerunning
  the same command resumes from ``runs/<name>/checkpoints/last.ckpt`` in the same W&B run;
- W&B is online when the user is logged in, offline otherwise, off with ``WANDB_MODE=disabled``; rank 0 logs;
  runs are grouped by paper and tagged with the dataset, and carry the resolved config and the git commit.
"""
from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from .callbacks import LastCheckpoint, NonFiniteLossGuard, PredictionSamples, RandomState, SpeedMonitor
from .module import ZooModule

__all__ = ["ZooCLI", "main", "wandb_mode"]

# The EMA copy is frozen in eval mode on purpose; and a Lightning-internal deprecation that users cannot act on.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; otherwise online when an API key is configured, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class LogConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the run directory and sends the resolved config and commit to W&B."""

    def save_config(self, trainer, pl_module, stage):
        flat = {k: v for k, v in vars(self.config.clone()).items()}
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        for lg in trainer.loggers:
            lg.log_hyperparams({"config": config, "git_commit": git_commit(), **_flatten(flat)})


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if hasattr(v, "__dict__") and not isinstance(v, (str, Path)):
            out.update(_flatten(vars(v), key + "."))
        elif isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def _paper_of(obj) -> str:
    """``zoo.fixmatch.module.FixMatch`` -> ``fixmatch``."""
    parts = type(obj).__module__.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "zoo" else parts[0]


class ZooCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        torch.set_float32_matmul_precision("high")
        super().__init__(
            ZooModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=LogConfig, save_config_kwargs={"overwrite": True},
            trainer_defaults={"use_distributed_sampler": False, "max_epochs": -1, "log_every_n_steps": 50},
            auto_configure_optimizers=False, parser_kwargs={"allow_abbrev": False}, args=args, run=run)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="run directory and W&B name (default: the config file's stem)")
        parser.add_argument("--run.root", type=str, default="runs", help="where run directories are created")
        parser.add_argument("--run.resume", type=bool, default=True,
                            help="resume from runs/<name>/checkpoints/last.ckpt when it exists")
        parser.add_argument("--run.checkpoint_every_n_steps", type=int, default=500)
        parser.add_argument("--run.wandb_project", type=str, default="zoo")
        parser.add_argument("--run.description", type=str, default="", help="one line shown by `make help`")

    # ------------------------------------------------------------------ parsing
    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except SystemExit:
            _suggest_keys(parser, args)
            raise

    # ---------------------------------------------------------- run directory
    def _run_settings(self):
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = cfg["run"]
        name = run["name"]
        if not name:
            # the experiment's stem: later --config files are overlays on it (offline stand-ins, protocols)
            configs = cfg.get("config") or []
            name = Path(str(configs[0])).stem if configs else "run"
        return cfg, run, name, Path(run["root"]) / name

    def instantiate_trainer(self, **kwargs):
        cfg, run, name, run_dir = self._run_settings()
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        callbacks += [
            # last.ckpt: every N steps, at the end, and when the run is interrupted (Ctrl-C, an exception)
            LastCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, save_on_exception=True,
                            every_n_train_steps=run["checkpoint_every_n_steps"], enable_version_counter=False),
            RandomState(), NonFiniteLossGuard(), SpeedMonitor(), PredictionSamples(),
        ]
        logger = self._make_logger(cfg, run, name, run_dir)
        if logger is not False:
            callbacks.append(LearningRateMonitor("step"))
        return super().instantiate_trainer(callbacks=callbacks, logger=logger, default_root_dir=str(run_dir),
                                           **kwargs)

    def _make_logger(self, cfg, run, name, run_dir):
        if cfg["trainer"].get("logger") is False:
            return False
        mode = wandb_mode()
        id_file = run_dir / "wandb_run_id"
        resume = run["resume"] and (run_dir / "checkpoints" / "last.ckpt").exists() and id_file.exists()
        run_id = id_file.read_text().strip() if resume else None
        dataset = getattr(self.datamodule, "dataset", None)
        logger = WandbLogger(name=name, project=run["wandb_project"], save_dir=str(run_dir), id=run_id,
                             resume="allow" if run_id else None, group=_paper_of(self.model),
                             tags=[t for t in (dataset, _paper_of(self.model)) if t], mode=mode,
                             config={"git_commit": git_commit()})
        self._logger = logger
        return logger

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # close the W&B run as failed, so the run shows its state and this process holds no stale run
            logger = getattr(self, "_logger", None)
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger._experiment.finish(exit_code=1)
            raise

    def before_fit(self) -> None:
        cfg, run, name, run_dir = self._run_settings()
        last = run_dir / "checkpoints" / "last.ckpt"
        if cfg.get("ckpt_path") is None and run["resume"] and last.exists():
            self._check_same_experiment(cfg, run_dir)
            print(f"[zoo] resuming {name} from {last}", flush=True)
            self.config_init[self.subcommand]["ckpt_path"] = str(last)
        if self.trainer.is_global_zero and isinstance(self.trainer.logger, WandbLogger):
            experiment = self.trainer.logger.experiment  # creates the run now, on rank 0 only
            if getattr(experiment, "id", None):
                (run_dir / "wandb_run_id").write_text(experiment.id)

    def _check_same_experiment(self, cfg, run_dir: Path) -> None:
        """Resuming continues *this* experiment: a run directory holding a run of another model or data (two
        comparisons with the same method names under one root, a reused ``--run.name``) is an error, not a silent
        resume of someone else's checkpoint. Only settings present in both configs count, so a constructor argument
        added to the code since the run started does not block its resume; the trainer may change (longer runs)."""
        saved_file = run_dir / "config.yaml"
        if not saved_file.exists():
            return
        saved = yaml.safe_load(saved_file.read_text()) or {}
        parser = self._parser(self.subcommand) if self.subcommand else self.parser
        current = yaml.safe_load(parser.dump(cfg, skip_none=False, format="yaml"))
        differences = [d for key in ("model", "data") for d in _differences(saved.get(key), current.get(key), key)]
        if differences:
            raise ValueError(
                f"{run_dir} holds a run of another experiment ({'; '.join(differences[:4])}); pick another "
                "--run.name or --run.root, or pass --run.resume=false to start this one over there")

    def after_fit(self) -> None:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if not self.trainer.is_global_zero:
            return
        metrics = results[0] if results else {}
        print("\n[zoo] final evaluation:")
        for key, value in sorted(metrics.items()):
            print(f"  {key:28s} {value:.4f}")
        _, _, name, run_dir = self._run_settings()
        print(f"[zoo] run directory: {run_dir}  (checkpoints in {run_dir / 'checkpoints'})")
        logger = self.trainer.logger
        if isinstance(logger, WandbLogger):
            experiment = logger.experiment
            mode = wandb_mode()
            if mode == "online" and getattr(experiment, "url", None):
                print(f"[zoo] W&B run: {experiment.url}")
            elif mode == "offline":
                print(f"[zoo] W&B run saved offline in {Path(experiment.dir).parent}; upload it with:\n"
                      f"      wandb sync {Path(experiment.dir).parent}")
            experiment.finish()


def _differences(saved, current, path: str) -> list[str]:
    """``path: saved -> current`` for each setting both configs hold with different values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for key in saved.keys() & current.keys()
                for d in _differences(saved[key], current[key], f"{path}.{key}")]
    return [] if saved == current else [f"{path}: {saved!r} -> {current!r}"]


def _suggest_keys(parser, args) -> None:
    """jsonargparse names the unexpected key; add the valid ones (and the closest), which it does not."""
    import yaml

    argv = [str(a) for a in (args if args is not None else sys.argv[1:])]
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    classes = {}
    for path in configs:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError:
            continue
        for section in ("model", "data"):
            if isinstance(loaded.get(section), dict) and "class_path" in loaded[section]:
                classes[section] = loaded[section]["class_path"]
    keys = re.findall(r"--([\w.]+)=", " ".join(argv))
    for path in configs:  # keys written in the YAML files themselves
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError:
            continue
        for section in ("model", "data"):
            init_args = (loaded.get(section) or {}).get("init_args") or {}
            keys += [f"{section}.init_args.{k}" for k in init_args]
    options = _parser_options(parser, argv)
    for key in keys:
        if key.split(".")[0] in ("trainer", "run") and options and key not in options:
            close = difflib.get_close_matches(key, options, n=3, cutoff=0.75)
            if close:
                print(f"[zoo] unknown option --{key}. Did you mean: {', '.join('--' + c for c in close)}?",
                      file=sys.stderr)
            continue
        section, _, rest = key.partition(".")
        name = rest.removeprefix("init_args.")
        if section not in classes or "." in name:
            continue
        valid = _init_arguments(classes[section])
        if valid and name not in valid:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            print(f"[zoo] {classes[section]} has no argument '{name}'.{hint}\n      Valid: {', '.join(valid)}",
                  file=sys.stderr)


def _parser_options(parser, argv) -> list[str]:
    try:
        sub = parser._subcommands_action._name_parser_map.get(argv[0]) if argv else None
    except AttributeError:
        sub = None
    return sorted({opt.lstrip("-") for action in (sub or parser)._actions for opt in action.option_strings})


def _init_arguments(class_path: str) -> list[str]:
    """The class's configurable arguments as jsonargparse resolves them (``**host`` pass-throughs included)."""
    import importlib

    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "init", fail_untyped=False)
    except Exception:  # an unimportable or unresolvable class: jsonargparse's own message stands alone
        return []
    return sorted({action.dest.split(".")[1] for action in parser._actions if action.dest.startswith("init.")})


def main(args=None) -> None:
    from .callbacks import NonFiniteLossError
    from .datasets import MissingDatasetError, MissingWeightsError

    try:
        ZooCLI(args=args)
    except (MissingDatasetError, MissingWeightsError, NonFiniteLossError) as err:  # expected failures: the message, not a traceback
        print(f"\n[zoo] {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
