"""``python -m zoo.tools.bench_data experiments/X.yaml --workers N --batches M [--key=value ...]``: input pipeline speed.

Builds the experiment's data module as training does (same views, batch sizes, samplers; ``--key=value``
overrides as for ``python -m zoo fit``), then iterates each training stream alone, with no model, through its
DataLoader with ``N`` workers (0: in this process). After ``--warmup`` batches it times ``M`` batches and prints,
per stream, samples/s per worker core = samples / CPU-seconds used by the processes doing the work (the
workers; this process when N=0). CPU time, unlike wall time, does not depend on what else runs on the machine;
the wall-clock samples/s is printed beside it. Samples are dataset items: an unlabeled item is all its views.
See docs/performance.md for the figures and how USB's pipeline was measured with :func:`measure_loader`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

__all__ = ["measure_loader", "training_streams", "main"]


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a (worker) process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuClock:
    """CPU seconds of the DataLoader's workers, or of this process when it loads in-process."""

    def __init__(self, iterator):
        workers = getattr(iterator, "_workers", None) or []
        self.pids = [w.pid for w in workers]

    def __call__(self) -> float:
        if not self.pids:
            return time.process_time()
        return sum(_process_cpu_seconds(pid) for pid in self.pids)


def measure_loader(loader: DataLoader, batches: int, warmup: int = 5, min_seconds: float = 2.0) -> dict[str, float]:
    """Time at least ``batches`` batches of ``loader``, and at least ``min_seconds`` (CPU time is counted in
    10 ms ticks), after ``warmup`` batches (worker start-up, first prefetches).

    Returns samples, wall seconds, worker CPU seconds and the two rates. The loader must drop incomplete batches
    so that every batch holds ``loader.batch_size`` samples; it is re-iterated if an epoch runs out.
    """
    if not loader.drop_last or loader.batch_size is None:
        raise ValueError("measure_loader needs a DataLoader with a batch_size and drop_last=True")
    iterator = iter(loader)

    def next_batch():
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
            return next(iterator)

    for _ in range(warmup):
        next_batch()
    cpu_clock = _CpuClock(iterator)
    cpu_start, wall_start = cpu_clock(), time.perf_counter()
    timed = 0
    while timed < batches or time.perf_counter() - wall_start < min_seconds:
        next_batch()
        timed += 1
    wall, cpu = time.perf_counter() - wall_start, cpu_clock() - cpu_start
    del iterator
    samples = timed * loader.batch_size
    return {"samples": samples, "wall_s": wall, "cpu_s": cpu, "samples_per_s": samples / wall,
            "samples_per_core_s": samples / cpu if cpu > 0 else float("nan")}


def training_streams(config: str, workers: int, overrides: list[str]) -> tuple[object, dict[str, DataLoader]]:
    """The experiment's data module and its training DataLoaders by stream name (``lb``, ``ulb``, ...)."""
    from lightning.pytorch.utilities import CombinedLoader

    from zoo.core.cli import ZooCLI

    with tempfile.TemporaryDirectory(prefix="zoo-bench-data-") as root:
        cli = ZooCLI(args=["--config", config, f"--data.init_args.num_workers={workers}", "--trainer.logger=false",
                           f"--run.root={root}", "--run.resume=false", *overrides], run=False)
    datamodule = cli.datamodule
    datamodule.setup("fit")
    loaders = datamodule.train_dataloader()
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.iterables
    if isinstance(loaders, DataLoader):
        loaders = {"train": loaders}
    return datamodule, dict(loaders)


def _views(loader: DataLoader) -> str:
    views = getattr(loader.dataset, "views", None)
    return "+".join(views) if isinstance(views, dict) else type(loader.dataset).__name__


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per stream (0: in-process)")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per stream (at least)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each stream at least this long")
    parser.add_argument("--warmup", type=int, default=5, help="batches before timing starts")
    args, overrides = parser.parse_known_args(argv)
    if args.workers == 0:
        torch.set_num_threads(1)  # in-process loading on one core, as a worker does (DataLoader sets 1 thread there)
    _, loaders = training_streams(args.config, args.workers, overrides)
    parts, core_seconds_per_step = [], 0.0
    for name, loader in loaders.items():
        m = measure_loader(loader, args.batches, args.warmup, args.min_seconds)
        core_seconds_per_step += loader.batch_size / m["samples_per_core_s"]
        parts.append(f"{name} ({_views(loader)}, batch {loader.batch_size}): {m['samples_per_core_s']:,.0f} "
                     f"samples/s per core, {m['samples_per_s']:,.0f}/s wall")
    print(f"[bench-data] {args.config}: workers={args.workers} | "
          + " | ".join(parts) + f" | {1000 * core_seconds_per_step:.1f} core-ms per training step", flush=True)


if __name__ == "__main__":
    main()
