"""Two-process CPU DDP (gloo) through the real command line: disjoint shards that together form the
single-process global batch, metrics reduced over both shards of the test set, exactly one W&B run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from helpers import build
from zoo.core.data import FixedLengthSampler

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "fixmatch_digits.yaml"
SETTINGS = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=8",
            "--data.init_args.uratio=2", "--data.init_args.steps_per_epoch=3", "--data.init_args.num_workers=0",
            "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1"]


def test_two_process_ddp(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "zoo", "fit", "--config", str(CONFIG), "--run.name=ddp", *SETTINGS,
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.callbacks+=helpers.RecordBatches", f"--trainer.callbacks.out_dir={tmp_path / 'batches'}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    ranks = [json.loads((tmp_path / "batches" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    datamodule = build(CONFIG, tmp_path / "single", *SETTINGS[2:]).datamodule
    datamodule.setup("fit")
    for stream, global_batch, stream_seed in (("lb", 8, 0), ("ulb", 16, 1)):
        size = len(datamodule.labeled_idx if stream == "lb" else datamodule.unlabeled_idx)
        single = FixedLengthSampler(size, global_batch * 3, seed=stream_seed)
        single.set_epoch(0)
        draws = [i for i, _ in single]
        for step in range(3):
            shard0, shard1 = ranks[0]["steps"][step][stream], ranks[1]["steps"][step][stream]
            assert len(shard0) == len(shard1) == global_batch // 2
            # positions of the global batch are disjoint across ranks and together make the whole batch
            assert sorted(shard0 + shard1) == sorted(draws[step * global_batch:(step + 1) * global_batch])

    # the logged accuracy is over the whole test set, not one rank's half
    printed = dict(re.findall(r"(val/\w+)\s+([0-9.]+)", out.stdout))
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    model = build(CONFIG, tmp_path / "single", *SETTINGS[2:]).model
    model.load_state_dict(ckpt["state_dict"], strict=False)
    model.eval()
    x = torch.from_numpy(datamodule.data.x_test).permute(0, 3, 1, 2)
    x = datamodule.on_after_batch_transfer({"image": x}, 0)["image"]
    y = torch.from_numpy(datamodule.data.y_test)
    with torch.no_grad():
        acc = (model.network(x).argmax(1) == y).float().mean().item()
        ema_acc = (model.ema(x).argmax(1) == y).float().mean().item()
    assert abs(float(printed["val/acc"]) - acc) < 1e-4
    assert abs(float(printed["val/ema_acc"]) - ema_acc) < 1e-4

    runs = list((tmp_path / "runs" / "ddp" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
