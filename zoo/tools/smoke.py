"""``python -m zoo.tools.smoke experiments/X.yaml [--key=value ...]``: a few training steps at tiny sizes.

The overrides are generic (trainer limits, and the data module's batch/worker/epoch sizes when it has those
arguments), so every experiment file gets the same treatment from ``make smoke`` and from the test suite.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import tempfile

import yaml

SMOKE_TRAINER = ["--trainer.max_steps=3", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=null",
                 "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
                 "--trainer.log_every_n_steps=1", "--run.resume=false"]
SMOKE_DATA = {"batch_size": 4, "eval_batch_size": 16, "num_workers": 0, "steps_per_epoch": 3}


def load_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def data_overrides(config: dict, sizes: dict = SMOKE_DATA) -> list[str]:
    data = config.get("data") or {}
    accepted = init_arguments(load_class(data["class_path"]))
    return [f"--data.init_args.{k}={v}" for k, v in sizes.items() if k in accepted]


def init_arguments(cls) -> set[str]:
    """Constructor arguments of ``cls``, including those a ``**kwargs`` passes on to its parents' constructors."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return names - {"self"}


def smoke_args(config_path: str, run_root: str, subcommand: bool = True, overlays: list[str] = ()) -> list[str]:
    """CLI arguments for a smoke run; ``subcommand=False`` for ``ZooCLI(run=False)`` (no ``fit``). ``overlays``
    (``--config`` pairs, e.g. the offline stand-in) come right after the experiment, before the tiny sizes."""
    with open(config_path) as f:
        config = yaml.safe_load(f)
    return ["fit"] * subcommand + ["--config", config_path, *overlays, *SMOKE_TRAINER, f"--run.root={run_root}",
                                   *data_overrides(config)]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m zoo.tools.smoke experiments/X.yaml [--key=value ...]")
    from zoo.core.cli import ZooCLI

    with tempfile.TemporaryDirectory(prefix="zoo-smoke-") as root:
        ZooCLI(args=smoke_args(argv[0], root) + argv[1:])


if __name__ == "__main__":
    main()
