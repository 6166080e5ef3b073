"""``python -m zoo.tools.compare`` end to end, as a user runs it: two methods x two seeds of a few steps each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0", "--data.init_args.steps_per_epoch=4", "--data.init_args.eval_batch_size=128"]


def run_compare(out: Path, root: Path):
    command = [sys.executable, "-m", "zoo.tools.compare", f"--out={out}", "--seeds=0,1", f"--root={root}",
               f"fixmatch={ROOT / 'experiments/fixmatch_digits.yaml'}",
               f"supervised={ROOT / 'experiments/supervised_digits.yaml'}", *TINY]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


def test_compare_trains_every_method_and_seed_and_writes_the_card(tmp_path):
    out = tmp_path / "card.md"
    results = run_compare(out, tmp_path / "runs")

    assert sorted((r["name"], r["seed"]) for r in results) == [("fixmatch", 0), ("fixmatch", 1),
                                                               ("supervised", 0), ("supervised", 1)]
    for r in results:
        assert [h["step"] for h in r["history"]] == [2, 4]  # the learning curve
        assert r["final"]["step"] == 4 and 0 <= r["final"]["val/ema_acc"] <= 1
    card = out.read_text()
    assert "| fixmatch |" in card and "| supervised |" in card and "card.png" in card
    assert out.with_suffix(".png").stat().st_size > 0

    # rerunning the same command re-evaluates the finished runs instead of training them again, and keeps their
    # learning curves (each run directory holds its validation history)
    again = run_compare(out, tmp_path / "runs")
    assert [r["final"]["val/acc"] for r in again] == [r["final"]["val/acc"] for r in results]
    assert all([h["step"] for h in a["history"]] == [2, 4] for a in again)
