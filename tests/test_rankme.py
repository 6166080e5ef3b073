"""The RankMe study driver (``zoo.rankme.study``): rank correlations and the selection gap on synthetic points whose
answer is known, the driver end to end on tiny checkpoints (evaluated as given, and trained through the CLI with the
study's checkpoint callback), and reruns that reuse what exists."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from zoo.rankme import study
from zoo.ssl.bank import FeatureBank, linear_probe, module_from_settings, rankme_of

TINY_MODEL = {"class_path": "zoo.ssl.hosts.SimCLR", "init_args": {
    "network": {"class_path": "zoo.ssl.encoders.timm_encoder",
                "init_args": {"name": "resnet18", "model_kwargs": {"channels": [8, 16, 32, 64]}}},
    "num_classes": 10, "projector_out_dim": 16}}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))


# -------------------------------------------------------------------------------- synthetic, known answers
def _bank_of_rank(rank: int, seed: int = 0, dim: int = 16, classes: int = 10) -> FeatureBank:
    """Embeddings with ``rank`` directions that carry the class (the rest collapsed to a tiny spread): more rank,
    more classes separable (rank r separates r + 1 of the 10), so RankMe and the probe's accuracy both grow."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, classes, n)
        codes = np.eye(classes)[labels][:, :rank] * 3 + rng.normal(size=(n, rank)) * 0.3
        basis = np.linalg.qr(np.random.default_rng(99).normal(size=(dim, dim)))[0][:rank]
        return (codes @ basis + rng.normal(size=(n, dim)) * 1e-3).astype(np.float32), labels

    (x_train, y_train), (x_test, y_test) = split(600), split(300)
    return FeatureBank(x_train, y_train, x_test, y_test, {"num_classes": classes})


def test_rankme_and_probe_accuracy_agree_on_banks_of_growing_rank():
    points = []
    for rank in (1, 2, 3, 4, 5, 6, 7, 8):
        bank = _bank_of_rank(rank)
        points.append({"checkpoint": f"rank{rank}", "setting": f"rank={rank}", "step": 1,
                       "rankme": rankme_of(bank), "rankme_backbone": rankme_of(bank),
                       "linear_acc": linear_probe(bank)["accuracy"]})
    assert np.all(np.diff([p["rankme"] for p in points]) > 0)
    analysis = study.analyse(points)
    assert analysis["correlation"]["spearman"] == pytest.approx(1.0)
    assert analysis["correlation"]["kendall"] == pytest.approx(1.0)
    assert analysis["selection_final"]["selected"] == "rank=8" and analysis["selection_final"]["gap"] == 0.0


def test_correlations_and_gap_against_scipy_on_crafted_points():
    rankme = [10.0, 20.0, 30.0, 40.0, 50.0, 35.0]
    accuracy = [0.30, 0.42, 0.40, 0.55, 0.50, 0.61]
    steps = [100, 200, 100, 200, 100, 200]
    settings = ["t=0.1", "t=0.1", "t=0.5", "t=0.5", "t=1.0", "t=1.0"]
    points = [{"checkpoint": f"c{i}", "setting": s, "step": st, "rankme": r, "rankme_backbone": -r, "linear_acc": a}
              for i, (s, st, r, a) in enumerate(zip(settings, steps, rankme, accuracy))]
    analysis = study.analyse(points)
    assert analysis["correlation"]["spearman"] == pytest.approx(stats.spearmanr(rankme, accuracy)[0])
    assert analysis["correlation"]["kendall"] == pytest.approx(stats.kendalltau(rankme, accuracy)[0])
    assert analysis["correlation_backbone_rankme"]["spearman"] == pytest.approx(-stats.spearmanr(rankme, accuracy)[0])
    # final checkpoints: t=0.1 (20, .42), t=0.5 (40, .55), t=1.0 (35, .61) -> RankMe picks t=0.5, the oracle t=1.0
    final = analysis["selection_final"]
    assert (final["selected"], final["oracle"], final["candidates"]) == ("t=0.5", "t=1.0", 3)
    assert final["gap"] == pytest.approx(0.06)
    # every checkpoint: the highest RankMe is t=1.0 at step 100 (0.50) against the oracle's 0.61
    assert analysis["selection_all"]["gap"] == pytest.approx(0.11)


def test_grid_expansion():
    grid = study.expand_grid(["model.init_args.temperature=0.1,0.5", "model.init_args.lr=0.03"])
    assert [s["name"] for s in grid] == ["temperature=0.1_lr=0.03", "temperature=0.5_lr=0.03"]
    assert grid[1]["overrides"] == ["--model.init_args.temperature=0.5", "--model.init_args.lr=0.03"]
    assert study.expand_grid([])[0]["overrides"] == []
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        study.expand_grid(["temperature"])


# ------------------------------------------------------------------------------------ the driver, end to end
def _tiny_checkpoints(tmp_path, seeds) -> list:
    paths = []
    for seed in seeds:
        module = module_from_settings({"model": TINY_MODEL}, seed)
        run = tmp_path / "runs" / f"seed{seed}"
        (run / "study_checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL}))
        torch.save({"state_dict": module.state_dict(), "global_step": 5},
                   run / "study_checkpoints" / "step=000005.ckpt")
        paths.append(str(run / "study_checkpoints" / "step=000005.ckpt"))
    return paths


def test_the_driver_on_given_checkpoints_writes_a_consistent_table(tmp_path):
    checkpoints = _tiny_checkpoints(tmp_path, seeds=(0, 1, 2))
    result = study.main(["--checkpoints", *checkpoints, "--dataset", "digits", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "rankme_study.json").read_text())
    points = saved["points"]
    assert [p["setting"] for p in points] == ["seed0", "seed1", "seed2"] and all(p["step"] == 5 for p in points)
    rho = stats.spearmanr([p["rankme"] for p in points], [p["linear_acc"] for p in points])[0]
    assert saved["analysis"]["correlation"]["spearman"] == pytest.approx(rho)
    best = max(points, key=lambda p: p["rankme"])
    assert saved["analysis"]["selection_final"]["selected"] == best["setting"]
    assert (tmp_path / "out" / "rankme_study.png").exists() and result["paths"]["md"].read_text().count("| seed") == 3
    with pytest.raises(SystemExit, match="at least 3"):
        study.main(["--checkpoints", *checkpoints[:2], "--dataset", "digits", "--out", str(tmp_path / "out2")])


def test_the_driver_trains_each_setting_keeps_its_checkpoints_and_reuses_them(tmp_path, monkeypatch):
    config = {"seed_everything": 0,
              "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "val_check_interval": 2,
                          "check_val_every_n_epoch": None,
                          "callbacks": [{"class_path": "zoo.rankme.callbacks.StudyCheckpoints",
                                         "init_args": {"every_n_steps": 1}}]},
             "model": {**TINY_MODEL, "init_args": {**TINY_MODEL["init_args"], "warmup_steps": 1}},
             "data": {"class_path": "zoo.ssl.data.SSLDataModule",
                      "init_args": {"dataset": "digits", "batch_size": 8, "steps_per_epoch": 2, "num_workers": 0,
                                    "views": {"class_path": "zoo.ssl.views.SimCLRViews"}}}}
    path = tmp_path / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--config", str(path), "--grid", "model.init_args.temperature=0.2,0.5", "--out", str(tmp_path / "out")]
    result = study.main(args)
    assert [(p["setting"], p["step"]) for p in result["points"]] == [
        ("temperature=0.2", 1), ("temperature=0.2", 2), ("temperature=0.5", 1), ("temperature=0.5", 2)]
    trained = torch.load(result["points"][-1]["checkpoint"], map_location="cpu", weights_only=False)
    assert trained["global_step"] == 2
    first = json.loads((tmp_path / "out" / "rankme_study.json").read_text())

    import lightning.pytorch as pl

    def no_training(*a, **k):
        raise AssertionError("a finished setting was trained again")

    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    again = study.main(args)
    assert [p["rankme"] for p in again["points"]] == [p["rankme"] for p in first["points"]]
