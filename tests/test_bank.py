"""Feature banks (``zoo.ssl.bank``): extracted once, then read from the cache; a corrupt cache file is rebuilt with a
warning (a bank is derived data), a corrupt file loaded directly is a clear error; checkpoints load through the
run's config; the probe, kNN and RankMe of a bank against scikit-learn / numpy."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import yaml

import zoo.ssl.bank as bank_module
from zoo.ssl.evaluation import weighted_knn_predict
from zoo.ssl.bank import (CorruptFeatureBankError, FeatureBank, feature_bank, feature_banks, knn_accuracy,
                          linear_probe, load_bank, module_from_settings, rankme_of, save_bank)

# An SSL host small enough for tests: SimCLR on a 1/8-width ResNet-18 (ImageNet stem: 32x32 -> 8x8), on digits
# (1,257 + 540 images)
TINY_MODEL = {"class_path": "zoo.ssl.hosts.SimCLR", "init_args": {
    "network": {"class_path": "zoo.ssl.encoders.timm_encoder",
                "init_args": {"name": "resnet18", "model_kwargs": {"channels": [8, 16, 32, 64]}}},
    "num_classes": 10, "projector_out_dim": 16}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "feature_banks"


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_MODEL}))
    return path


def _tiny_run(tmp_path, seed: int) -> tuple[torch.nn.Module, "Path"]:
    """A tiny SimCLR saved as a run: runs/<name>/config.yaml and runs/<name>/checkpoints/last.ckpt."""
    module = module_from_settings({"model": TINY_MODEL}, seed)
    run = tmp_path / "runs" / f"tiny_seed{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL}))
    torch.save({"state_dict": module.state_dict(), "global_step": 0}, run / "checkpoints" / "last.ckpt")
    return module, run / "checkpoints" / "last.ckpt"


def _no_extraction(*args, **kwargs):
    raise AssertionError("features were extracted again instead of read from the cache")


def test_a_bank_is_extracted_once_then_read_from_the_cache(cache, tiny_config, monkeypatch):
    logs = []
    banks = feature_banks("digits", random_init=tiny_config, seed=0, layers=("backbone", "projector"), log=logs.append)
    backbone, projector = banks["backbone"], banks["projector"]
    assert backbone.train_features.shape == (1257, 64) and projector.test_features.shape == (540, 16)
    assert backbone.train_features.dtype == np.float32 and backbone.train_labels.dtype == np.int64
    assert backbone.meta["source"]["kind"] == "init" and backbone.path.parent == cache / "digits"
    assert len(logs) == 1  # one pass over the images for both layers

    monkeypatch.setattr(bank_module, "extract_features", _no_extraction)
    again = feature_bank("digits", random_init=tiny_config, seed=0, layer="projector")
    np.testing.assert_array_equal(again.train_features, projector.train_features)
    assert again.path == projector.path
    assert sorted(p.name for p in (cache / "digits").iterdir()) == sorted([backbone.path.name, projector.path.name])
    # another initialisation is another bank
    monkeypatch.undo()
    other = feature_bank("digits", random_init=tiny_config, seed=1, layer="backbone", log=lambda _: None)
    assert other.path != backbone.path and not np.allclose(other.train_features, backbone.train_features)


def test_a_checkpoint_loads_through_its_run_config_and_is_keyed_by_its_content(cache, tmp_path, monkeypatch):
    module, checkpoint = _tiny_run(tmp_path, seed=3)
    bank = feature_bank("digits", checkpoint=checkpoint, log=lambda _: None)
    with torch.no_grad():
        from zoo.core.datasets import load_image_set

        data = load_image_set("digits")
        x = torch.from_numpy(data.x_test[:8]).permute(0, 3, 1, 2).float()
        mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
        std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
        expected = module.eval().network((x - mean) / std).numpy()
    np.testing.assert_allclose(bank.test_features[:8], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(bank.test_labels, data.y_test)
    assert bank.meta["source"]["sha256"] == bank_module.file_digest(checkpoint)

    # the same file elsewhere (a renamed run) is the same bank: no extraction
    moved = tmp_path / "elsewhere" / "checkpoints" / "step=000000.ckpt"
    moved.parent.mkdir(parents=True)
    moved.write_bytes(checkpoint.read_bytes())
    monkeypatch.setattr(bank_module, "extract_features", _no_extraction)
    assert feature_bank("digits", checkpoint=moved).path == bank.path


def test_missing_or_unreadable_checkpoints_are_clear_errors(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.ckpt"):
        feature_bank("digits", checkpoint=tmp_path / "nope.ckpt")
    broken = tmp_path / "run" / "checkpoints" / "last.ckpt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint"):
        feature_bank("digits", checkpoint=broken)
    _, checkpoint = _tiny_run(tmp_path, seed=0)
    (checkpoint.parent.parent / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="run config is not at"):
        feature_bank("digits", checkpoint=checkpoint)
    with pytest.raises(ValueError, match="exactly one"):
        feature_bank("digits")


def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(cache, tiny_config):
    good = feature_bank("digits", random_init=tiny_config, log=lambda _: None)
    good.path.write_bytes(good.path.read_bytes()[:100])  # truncated, as a full disk would leave it
    with pytest.raises(CorruptFeatureBankError, match=str(good.path)):
        load_bank(good.path)  # loading a file directly has nothing to rebuild from: a clear error
    logs = []
    with pytest.warns(UserWarning, match="cannot be read.*rebuilding it"):
        rebuilt = feature_bank("digits", random_init=tiny_config, log=logs.append)
    np.testing.assert_array_equal(rebuilt.train_features, good.train_features)
    assert load_bank(good.path).meta == rebuilt.meta  # the file is whole again
    assert any("rebuilding" in line for line in logs)


def test_a_cache_file_written_for_something_else_is_rebuilt(cache, tiny_config):
    good = feature_bank("digits", random_init=tiny_config, log=lambda _: None)
    stale = FeatureBank(good.train_features[:, :3], good.train_labels, good.test_features[:, :3], good.test_labels,
                        {**good.meta, "format": 0})
    save_bank(stale, good.path)
    logs = []
    rebuilt = feature_bank("digits", random_init=tiny_config, log=logs.append)
    assert rebuilt.dim == 64 and "rebuilding" in logs[0]


def test_bank_files_are_written_atomically(tmp_path, monkeypatch):
    bank = FeatureBank(np.zeros((4, 2), np.float32), np.arange(4), np.zeros((2, 2), np.float32), np.arange(2),
                       {"num_classes": 4})
    path = tmp_path / "banks" / "b.npz"

    def dies_while_writing(file, **arrays):
        file.write(b"half a bank")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_bank(bank, path)
    assert list(path.parent.iterdir()) == []  # neither a partial bank nor a temporary file
    monkeypatch.undo()
    save_bank(bank, path)
    assert load_bank(path).meta == {"num_classes": 4}


def test_load_bank_names_what_is_wrong(tmp_path):
    path = tmp_path / "b.npz"
    np.savez(path, train_features=np.zeros((3, 2)), train_labels=np.arange(2), test_features=np.zeros((1, 2)),
             test_labels=np.arange(1), meta=np.array("{}"))
    with pytest.raises(CorruptFeatureBankError, match="do not match"):
        load_bank(path)
    np.savez(path, train_features=np.zeros((3, 2)))
    with pytest.raises(CorruptFeatureBankError, match="lacks"):
        load_bank(path)
    with pytest.raises(FileNotFoundError):
        load_bank(tmp_path / "none.npz")


# ------------------------------------------------------------------------------------- evaluations of a bank
def _synthetic_bank(seed=0, n_train=400, n_test=150, dim=12, classes=4) -> FeatureBank:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 0.4
    y_train, y_test = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    scale = np.linspace(0.2, 5.0, dim)  # unequal feature scales: standardisation matters
    x_train = ((centers[y_train] + rng.normal(size=(n_train, dim))) * scale).astype(np.float32)
    x_test = ((centers[y_test] + rng.normal(size=(n_test, dim))) * scale).astype(np.float32)
    return FeatureBank(x_train, y_train, x_test, y_test, {"num_classes": classes})


def test_linear_probe_is_standardised_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bank = _synthetic_bank()
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000))
    expected = reference.fit(bank.train_features, bank.train_labels).score(bank.test_features, bank.test_labels)
    assert linear_probe(bank, C=0.5)["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert 0.5 < expected < 1.0


def test_knn_on_a_bank_matches_scikit_learn():
    """The family's weighted kNN is scikit-learn's cosine kNN with weights exp(similarity / 0.07)."""
    from sklearn.neighbors import KNeighborsClassifier

    bank = _synthetic_bank(seed=1)
    reference = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                                     weights=lambda distance: np.exp((1.0 - distance) / 0.07))
    expected = reference.fit(bank.train_features, bank.train_labels).predict(bank.test_features)
    scores = weighted_knn_predict(torch.from_numpy(bank.test_features), torch.from_numpy(bank.train_features),
                                  torch.from_numpy(bank.train_labels), 4)
    np.testing.assert_array_equal(scores.argmax(1).numpy(), expected)
    assert knn_accuracy(bank) == pytest.approx((expected == bank.test_labels).mean(), abs=1e-6)  # float32 mean


def test_rankme_of_a_bank_is_the_entropy_of_its_normalised_singular_values():
    bank = _synthetic_bank(seed=2)
    sigma = np.linalg.svd(bank.test_features[:100].astype(np.float64), compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    assert rankme_of(bank, "test", max_samples=100) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_the_bank_command_writes_its_tables(cache, tiny_config, tmp_path, capsys):
    # an output prefix with a dot in it (a run named temperature=0.5) keeps its whole name
    bank_module.main(["--random-init", str(tiny_config), "--dataset", "digits", "--out", str(tmp_path / "t=0.5")])
    result = json.loads((tmp_path / "t=0.5.json").read_text())
    assert 0.1 < result["linear_probe"]["accuracy"] <= 1 and result["rankme"] >= 1
    assert "linear probe acc" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bank_module.main(["--random-init", str(tiny_config), "--dataset", "digits", "--study", "sample_efficiency",
                          "--sizes", "20", "100", "--repeats", "2", "--out", str(tmp_path / "se")])
    saved = json.loads((tmp_path / "se.json").read_text())
    assert saved["config"]["classifiers"] == ["logistic_regression", "knn"] and (tmp_path / "se.png").exists()
