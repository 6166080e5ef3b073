"""``python -m zoo.tools.bench experiments/X.yaml --steps N [--key=value ...]``: training throughput.

Runs N training steps of the experiment as configured (no validation, no logger) and prints samples/s (dataset
items of all streams, summed over processes) and the share of wall time the training loop waited for data. The
first steps (worker start-up, warm-up) are excluded.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from zoo.core.callbacks import SpeedMonitor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=100)
    args, overrides = parser.parse_known_args(argv)
    from zoo.core.cli import ZooCLI

    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as root:
        cli = ZooCLI(args=["--config", args.config, f"--trainer.max_steps={args.steps}",
                           "--trainer.limit_val_batches=0", "--trainer.logger=false",
                           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                           f"--run.root={root}", "--run.resume=false", "--run.checkpoint_every_n_steps=1000000000",
                           *overrides], run=False)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        wall = time.perf_counter() - start
    speed = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SpeedMonitor)).summary()
    print(f"[bench] {args.config}: {speed['samples_per_sec']:.1f} samples/s, data wait "
          f"{100 * speed['data_wait_share']:.1f}% of step time, {args.steps} steps in {wall:.1f}s "
          f"(devices={cli.trainer.num_devices}, workers={getattr(cli.datamodule, 'num_workers', '?')}, "
          f"precision={cli.trainer.precision})")


if __name__ == "__main__":
    main()
