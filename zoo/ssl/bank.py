"""Frozen-feature evaluation: extract an encoder's features once into a cached bank, then probe the bank offline.

    python -m zoo.ssl.bank --checkpoint runs/simclr_cifar10_subset/checkpoints/last.ckpt --dataset cifar10_subset
    python -m zoo.ssl.bank --random-init experiments/simclr_cifar10_subset.yaml --seed 0   # the same net, untrained
    python -m zoo.ssl.bank --encoder resnet18 --cifar-stem --seed 0                        # a timm encoder
    python -m zoo.ssl.bank --checkpoint ... --study sample_efficiency --out runs/bank/se   # probe/kNN error vs m

It prints a table (linear probe, kNN, RankMe) and writes it as ``<out>.json`` / ``<out>.md`` (the sweep also
``<out>.png``). The naive Bayes vs logistic regression study on a bank is ``python -m zoo.gen_vs_dis_nb.study``
(same options): the naive Bayes is that paper's model, and a family does not import a paper.

A **bank** holds ``train_features, train_labels, test_features, test_labels`` (float32 / int64) and ``meta`` for one
(encoder, image set, layer). It is cached as ``<cache>/feature_banks/<dataset>/<kind>-<digest>-<layer>.npz`` where
``<cache>`` is ``$ZOO_CACHE_DIR`` or ``data_root()/cache`` and ``digest`` is the SHA-256 of the checkpoint file (or,
for an untrained module or encoder, of its initial weights): the same weights on the same images give the same file
whatever the run is called. The file is written to a temporary name and renamed (a killed writer leaves no half
bank). A cache file that cannot be read, or whose ``meta`` does not match what was asked, is **rebuilt** with a warning: a bank is
derived data and rebuilding it gives the same arrays; :func:`load_bank` on a path raises
:class:`CorruptFeatureBankError` instead, since it has nothing to rebuild from.

Layers: ``backbone`` is the representation (encoder output, what linear probes read), ``projector`` the embedding
the SSL criterion sees (RankMe's ``Z``). Images are normalised with the image set's mean/std on the 0..255 scale
(``zoo.core.data.normalise_images``), at their stored size, with the module in eval mode.

Offline evaluations of a bank:
- :func:`linear_probe`: scikit-learn ``LogisticRegression`` (L-BFGS, L2 with ``C``) on standardised features (mean
  and std of the training features). A convex problem solved to its unique optimum: no learning rate, epochs or seed
  to tune, so the probe's accuracy depends on the features alone, which is what a comparison of checkpoints (RankMe's
  rank correlation) needs. For banks too large for L-BFGS on a CPU, a torch linear layer on a GPU would be the
  choice; none of the zoo's offline sets needs it.
- :func:`knn_accuracy`: the family's weighted kNN (``zoo.ssl.evaluation``; k = 20, tau = 0.07).
- :func:`sample_size_sweep`: classifiers against the number of labelled training samples ``m`` (the sweep of
  Zheng et al. 2023, ``main_train_offline.py``): per ``m`` and repeat one subsample, drawn uniformly and redrawn
  until every class appears, scaled on the subsample only, and given to *every* classifier, so their errors are
  paired; mean, std and a t-interval over repeats. ``zoo.gen_vs_dis_nb`` runs its naive Bayes vs logistic
  regression study on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
import torch.nn as nn

from zoo.core.data import normalise_images
from zoo.core.datasets import data_root, evaluation_images, load_image_set

__all__ = ["FeatureBank", "CorruptFeatureBankError", "cache_root", "feature_bank", "feature_banks", "save_bank",
           "load_bank", "load_module", "module_from_settings", "feature_function", "extract_features", "linear_probe",
           "knn_accuracy", "rankme_of", "draw_subsample", "scale_on_subsample", "sample_size_sweep", "SweepResult",
           "write_sweep_report", "main"]

BANK_FORMAT = 1  # bump when what a bank holds or how features are computed changes: old files are then rebuilt
ARRAYS = ("train_features", "train_labels", "test_features", "test_labels")


class CorruptFeatureBankError(ValueError):
    """A bank file that cannot be read or is inconsistent (truncated, not an .npz, missing arrays, bad meta).
    :func:`feature_banks` rebuilds such a cache file; delete it, or rebuild with ``--rebuild``, otherwise."""


@dataclass
class FeatureBank:
    train_features: np.ndarray  # (N, D) float32
    train_labels: np.ndarray  # (N,) int64
    test_features: np.ndarray
    test_labels: np.ndarray
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the cache file it was read from or written to

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or max(self.train_labels.max(), self.test_labels.max()) + 1)

    @property
    def dim(self) -> int:
        return int(self.train_features.shape[1])


# ------------------------------------------------------------------------------------------------ cache files
def cache_root() -> Path:
    """``$ZOO_CACHE_DIR/feature_banks``, default ``data_root()/cache/feature_banks``."""
    base = Path(os.environ["ZOO_CACHE_DIR"]) if os.environ.get("ZOO_CACHE_DIR") else data_root() / "cache"
    return base.expanduser() / "feature_banks"


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the state dict (names and bytes), for encoders that have no checkpoint file."""
    sha = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def save_bank(bank: FeatureBank, path: Path) -> Path:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem + ".", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
        try:
            np.savez(f, **{name: getattr(bank, name) for name in ARRAYS}, meta=np.array(json.dumps(bank.meta)))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    bank.path = path
    return path


def load_bank(path: Path) -> FeatureBank:
    """Read a bank file; :class:`CorruptFeatureBankError` names the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature bank not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (*ARRAYS, "meta") if k not in data.files]
            if missing:
                raise CorruptFeatureBankError(f"feature bank {path} lacks {missing}")
            arrays = {k: data[k] for k in ARRAYS}
            meta = json.loads(str(data["meta"]))
    except CorruptFeatureBankError:
        raise
    except Exception as err:  # zipfile.BadZipFile, EOFError, ValueError, OSError, json errors
        raise CorruptFeatureBankError(f"feature bank {path} cannot be read ({type(err).__name__}: {err})") from err
    for split in ("train", "test"):
        features, labels = arrays[f"{split}_features"], arrays[f"{split}_labels"]
        if features.ndim != 2 or labels.shape != (len(features),):
            raise CorruptFeatureBankError(f"feature bank {path}: {split} features {features.shape} and labels "
                                          f"{labels.shape} do not match")
    if arrays["train_features"].shape[1] != arrays["test_features"].shape[1]:
        raise CorruptFeatureBankError(f"feature bank {path}: train and test feature sizes differ")
    return FeatureBank(**arrays, meta=meta, path=path)


# ------------------------------------------------------------------------------------------- encoders
def module_from_settings(settings: dict, seed: int | None = None) -> nn.Module:
    """The LightningModule of a run config or experiment file (its ``model:`` section), in eval mode; ``seed`` seeds
    the initialisation."""
    import lightning as L
    from jsonargparse import ArgumentParser

    if "model" not in settings:
        raise ValueError("the config has no 'model:' section (expected a run's config.yaml or an experiments/*.yaml)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    parsed = parser.parse_object({"model": settings["model"]})
    if seed is not None:
        torch.manual_seed(seed)
    return parser.instantiate(parsed).model.eval()


def read_config(config: str | Path) -> dict:
    import yaml

    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config not found: {config}")
    return yaml.safe_load(config.read_text())


def load_module(checkpoint: str | Path, config: str | Path | None = None) -> tuple[nn.Module, dict]:
    """A trained zoo module with the checkpoint's weights, in eval mode, and the run's config as a dict.

    The class and its arguments come from the checkpoint's ``hyper_parameters`` when they name the class
    (``_class_path``, what LightningCLI stores for modules that save their hyper-parameters), otherwise from the
    run's ``config.yaml`` beside ``checkpoints/`` (or ``config``), as ``zoo.ict.sample.load_run`` does."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{checkpoint} cannot be read as a torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{checkpoint} is not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(state.get("hyper_parameters") or {})
    if "_class_path" in hparams:
        settings = {"model": {"class_path": hparams.pop("_class_path"),
                              "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}}
    else:
        config = Path(config) if config else checkpoint.parent.parent / "config.yaml"
        if not config.exists():
            raise FileNotFoundError(f"{checkpoint} does not name its module class and the run config is not at "
                                    f"{config}; pass config= (the run's config.yaml or its experiments/*.yaml)")
        settings = read_config(config)
    module = module_from_settings(settings)
    module.load_state_dict(state["state_dict"])
    return module.eval(), settings


LAYERS = ("backbone", "projector")


def feature_function(module: nn.Module, layers: Iterable[str] = ("backbone",)) -> Callable:
    """``images -> {layer: features}`` of a family host (``zoo.ssl.hosts.SSLModule``: ``network`` is the encoder,
    ``embedding(features)`` the projection the SSL loss compares) or of a bare encoder (``backbone`` only), in one
    forward pass whatever the layers."""
    layers = tuple(layers)
    unknown = set(layers) - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)}; use {' or '.join(LAYERS)}")
    encoder = module.network if isinstance(getattr(module, "network", None), nn.Module) else module
    if "projector" in layers and not callable(getattr(module, "embedding", None)):
        raise ValueError(f"{type(module).__name__} has no embedding(features) (a zoo.ssl host's projection): the "
                         "projector layer needs one")

    def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        backbone = encoder(x)
        out = {"backbone": backbone} if "backbone" in layers else {}
        if "projector" in layers:
            out["projector"] = module.embedding(backbone)
        return out

    return features


def named_encoder(name: str, seed: int = 0, pretrained: bool = False, cifar_stem: bool = False,
                  model_kwargs: dict | None = None) -> nn.Module:
    """The family's encoder ``name`` (``zoo.ssl.encoders.timm_encoder``): random init drawn with ``seed``, or the
    hub's weights with ``pretrained``."""
    from zoo.ssl.encoders import timm_encoder

    torch.manual_seed(seed)
    return timm_encoder(name, pretrained=pretrained, cifar_stem=cifar_stem, model_kwargs=model_kwargs)


@torch.no_grad()
def extract_features(fn: Callable, images: np.ndarray, mean: Iterable[float], std: Iterable[float],
                     batch_size: int = 256, device: str = "cpu") -> dict[str, np.ndarray]:
    """``fn``'s named features (float32) of uint8 ``(N, H, W, C)`` images normalised with ``mean``/``std`` given in
    [0, 1], in image order."""
    mean = torch.tensor(list(mean)).view(1, -1, 1, 1) * 255
    std = torch.tensor(list(std)).view(1, -1, 1, 1) * 255
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        for name, features in fn(normalise_images(batch.to(device), mean, std)).items():
            out.setdefault(name, []).append(features.flatten(1).float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def feature_banks(dataset: str, checkpoint: str | Path | None = None, encoder: str | None = None,
                  random_init: str | Path | None = None, seed: int = 0, layers: Iterable[str] = ("backbone",),
                  config: str | Path | None = None, pretrained: bool = False, cifar_stem: bool = False,
                  batch_size: int = 256, device: str = "cpu", rebuild: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, FeatureBank]:
    """The banks of one source on ``dataset``, one per layer: read from the cache when they are there; the missing
    ones extracted together, in one pass over the images, and cached.

    Sources (exactly one): ``checkpoint``, a zoo SSL run's ``.ckpt`` (its module from ``config`` or the run's
    ``config.yaml``); ``random_init``, an experiment file or run config whose module is built untrained with
    ``seed`` (the random-init baseline of the *same* architecture); ``encoder``, a timm name through
    ``zoo.ssl.encoders.timm_encoder`` (random init with ``seed``, or ``pretrained``)."""
    if sum(s is not None for s in (checkpoint, encoder, random_init)) != 1:
        raise ValueError("give exactly one of checkpoint= (a run's .ckpt), random_init= (an experiment file) or "
                         "encoder= (a timm encoder name)")
    layers = tuple(dict.fromkeys(layers))
    module = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        source = {"kind": "checkpoint", "path": str(checkpoint), "sha256": file_digest(checkpoint)}
    elif random_init is not None:
        module = module_from_settings(read_config(random_init), seed)
        source = {"kind": "init", "config": str(random_init), "seed": seed, "sha256": weights_digest(module)}
    else:
        module = named_encoder(encoder, seed, pretrained, cifar_stem)
        source = {"kind": "encoder", "name": encoder, "seed": seed, "pretrained": pretrained,
                  "cifar_stem": cifar_stem, "sha256": weights_digest(module)}

    banks, keys, paths = {}, {}, {}
    for layer in layers:
        keys[layer] = {"format": BANK_FORMAT, "dataset": dataset, "layer": layer, "sha256": source["sha256"]}
        paths[layer] = cache_root() / dataset / f"{source['kind']}-{source['sha256'][:16]}-{layer}.npz"
        if paths[layer].exists() and not rebuild:
            try:
                bank = load_bank(paths[layer])
            except CorruptFeatureBankError as err:
                warnings.warn(f"{err}; rebuilding it", stacklevel=2)
                log(f"[bank] {err}; rebuilding it")
                continue
            found = {k: bank.meta.get(k) for k in keys[layer]}
            if found == keys[layer]:
                banks[layer] = bank
            else:
                log(f"[bank] {paths[layer]} was written for {found}, not {keys[layer]}: rebuilding it")
    missing = [layer for layer in layers if layer not in banks]
    if not missing:
        return banks

    if module is None:
        module, _ = load_module(checkpoint, config)
    module = module.to(device).eval()
    data = load_image_set(dataset, download=False)
    fn = feature_function(module, missing)
    start = time.perf_counter()
    # evaluation_images: a lazily decoded folder (ImageNet) as fixed-size centre crops; in-memory arrays unchanged
    train = extract_features(fn, evaluation_images(data.x_train), data.mean, data.std, batch_size, device)
    test = extract_features(fn, evaluation_images(data.x_test), data.mean, data.std, batch_size, device)
    seconds = time.perf_counter() - start
    for layer in missing:
        meta = {**keys[layer], "source": source, "num_classes": data.num_classes, "classes": list(data.classes),
                "dim": int(train[layer].shape[1]), "num_train": len(data.y_train), "num_test": len(data.y_test),
                "extract_seconds": round(seconds, 2), "device": device, "torch": torch.__version__,
                "module": f"{type(module).__module__}.{type(module).__name__}"}
        banks[layer] = FeatureBank(train[layer], data.y_train.astype(np.int64), test[layer],
                                   data.y_test.astype(np.int64), meta)
        save_bank(banks[layer], paths[layer])
    log(f"[bank] {len(data.y_train)}+{len(data.y_test)} {dataset} features ({', '.join(missing)}) in {seconds:.1f}s "
        f"-> {paths[missing[0]].parent}")
    return banks


def feature_bank(dataset: str, checkpoint: str | Path | None = None, encoder: str | None = None,
                 random_init: str | Path | None = None, seed: int = 0,
                 layer: Literal["backbone", "projector"] = "backbone", **kwargs) -> FeatureBank:
    """The bank of one source at one layer (see :func:`feature_banks`)."""
    return feature_banks(dataset, checkpoint, encoder, random_init, seed, (layer,), **kwargs)[layer]


# ------------------------------------------------------------------------------------------- evaluations
def linear_probe(bank: FeatureBank, C: float = 1.0, max_iter: int = 1000) -> dict:
    """Test accuracy of an L2 logistic regression (L-BFGS) on features standardised with the training statistics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    scaler = StandardScaler().fit(bank.train_features)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        probe = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(bank.train_features),
                                                               bank.train_labels)
    accuracy = probe.score(scaler.transform(bank.test_features), bank.test_labels)
    iterations = int(np.max(probe.n_iter_))
    return {"accuracy": float(accuracy), "C": C, "iterations": iterations, "converged": iterations < max_iter,
            "seconds": time.perf_counter() - start}


def knn_accuracy(bank: FeatureBank, k: int = 20, temperature: float = 0.07) -> float:
    """Test accuracy of the family's weighted kNN (``zoo.ssl.evaluation.knn_accuracy``: cosine similarity, the k
    nearest training features vote with weight ``exp(s / temperature)``)."""
    from zoo.ssl.evaluation import knn_accuracy as family_knn_accuracy

    return family_knn_accuracy(torch.from_numpy(bank.test_features), torch.from_numpy(bank.test_labels),
                               torch.from_numpy(bank.train_features), torch.from_numpy(bank.train_labels),
                               bank.num_classes, k, temperature)


def rankme_of(bank: FeatureBank, split: Literal["train", "test"] = "test", max_samples: int = 25600,
              eps: float = 1e-7) -> float:
    """RankMe (``zoo.ssl.evaluation.rankme``) of the first ``max_samples`` features of ``split``; the test split by
    default, the fixed held-out set the family's hosts log ``val/rankme`` on."""
    from zoo.ssl.evaluation import rankme

    features = bank.train_features if split == "train" else bank.test_features
    return rankme(torch.from_numpy(features[:max_samples]), eps)


# ------------------------------------------------------------------------------------ sample-size sweep
def draw_subsample(labels: np.ndarray, m: int, num_classes: int, rng: np.random.Generator,
                   max_draws: int = 10_000) -> np.ndarray:
    """``m`` distinct indices drawn uniformly (``train_test_split(train_size=m)`` in the official code), redrawn
    until every class appears; ``m >= len(labels)`` is the whole set (every repeat then sees the same data)."""
    if m >= len(labels):
        return np.arange(len(labels))
    if m < num_classes:
        raise ValueError(f"m = {m} samples cannot hold all {num_classes} classes")
    for _ in range(max_draws):
        indices = rng.choice(len(labels), size=m, replace=False)
        if len(np.unique(labels[indices])) == num_classes:
            return indices
    raise RuntimeError(f"no subsample of {m} held all {num_classes} classes in {max_draws} draws")


def scale_on_subsample(train: np.ndarray, test: np.ndarray, scaling: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``minmax``: to [0, 1] with the subsample's per-feature min and max (scikit-learn's ``MinMaxScaler``, as the
    official ``--minmax``; test values may fall outside); ``standard``: zero mean, unit variance; ``None``: as is."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)  # banks are float32; fits in float64
    if scaling is None:
        return train, test
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    scaler = {"minmax": MinMaxScaler, "standard": StandardScaler}[scaling]().fit(train)
    return scaler.transform(train), scaler.transform(test)


@dataclass
class SweepResult:
    records: list[dict]  # one per (m, repeat, classifier): error, fit seconds, subsample digest
    config: dict

    def errors(self, classifier: str, m: int) -> np.ndarray:
        return np.array([r["error"] for r in self.records if r["classifier"] == classifier and r["m"] == m])

    def summary(self, confidence: float = 0.95) -> list[dict]:
        """Per classifier and ``m``: mean and std (ddof 1) of the test error, and the half-width of the
        two-sided t confidence interval of the mean over repeats."""
        from scipy import stats

        rows = []
        for name in self.config["classifiers"]:
            for m in self.config["sizes"]:
                errors = self.errors(name, m)
                n = len(errors)
                std = float(errors.std(ddof=1)) if n > 1 else 0.0
                half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
                rows.append({"classifier": name, "m": m, "mean_error": float(errors.mean()), "std": std,
                             "ci_half_width": half, "confidence": confidence, "repeats": n})
        return rows

    def to_json(self) -> dict:
        return {"config": self.config, "summary": self.summary(), "records": self.records}


def sample_size_sweep(bank: FeatureBank, classifiers: dict[str, Callable[[], Any]], sizes: Iterable[int],
                      repeats: int = 5, seed: int = 0, scaling: str | None = "minmax",
                      log: Callable[[str], None] = print) -> SweepResult:
    """Test error of each classifier (a factory of objects with ``fit(X, y)`` and ``predict(X)``) trained on ``m``
    samples, for each ``m`` in ``sizes`` and ``repeats`` subsamples each. Subsample ``(m, r)`` is drawn with the
    generator ``default_rng([seed, m, r])`` (adding a size or a repeat leaves the others' subsamples as they were),
    scaled on itself, and given to every classifier."""
    sizes = sorted({min(int(m), len(bank.train_labels)) for m in sizes})
    records = []
    for m in sizes:
        for repeat in range(repeats):
            indices = draw_subsample(bank.train_labels, m, bank.num_classes, np.random.default_rng([seed, m, repeat]))
            train, test = scale_on_subsample(bank.train_features[indices], bank.test_features, scaling)
            labels = bank.train_labels[indices]
            digest = hashlib.sha1(np.sort(indices).tobytes()).hexdigest()[:12]
            for name, make in classifiers.items():
                start = time.perf_counter()
                model = make().fit(train, labels)
                error = float((np.asarray(model.predict(test)) != bank.test_labels).mean())
                records.append({"m": m, "repeat": repeat, "classifier": name, "error": error,
                                "fit_seconds": round(time.perf_counter() - start, 4), "subsample": digest})
        means = {name: np.mean([r["error"] for r in records if r["m"] == m and r["classifier"] == name])
                 for name in classifiers}
        log(f"[sweep] m = {m:6d}: " + "  ".join(f"{n} {100 * e:5.1f}%" for n, e in means.items()))
    config = {"sizes": sizes, "repeats": repeats, "seed": seed, "scaling": scaling,
              "classifiers": list(classifiers), "bank": {k: v for k, v in bank.meta.items() if k != "classes"}}
    return SweepResult(records, config)


def sweep_markdown(result: SweepResult, title: str = "") -> str:
    rows = result.summary()
    names = result.config["classifiers"]
    confidence = int(100 * rows[0]["confidence"]) if rows else 95
    lines = [f"### {title}", ""] if title else []
    lines += [f"| m | " + " | ".join(f"{n} error (%), mean ± {confidence}% CI" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for m in result.config["sizes"]:
        cells = []
        for name in names:
            row = next(r for r in rows if r["classifier"] == name and r["m"] == m)
            cells.append(f"{100 * row['mean_error']:.2f} ± {100 * row['ci_half_width']:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"{result.config['repeats']} repeats per m (seed {result.config['seed']}), features scaled with "
              f"`{result.config['scaling']}` on each training subsample; the same subsamples for every classifier."]
    return "\n".join(lines) + "\n"


def output_path(prefix: str | Path, ext: str) -> Path:
    """``<prefix>.<ext>``; not ``Path.with_suffix``, which would cut a prefix such as ``temperature=0.5_step=300``."""
    prefix = Path(prefix)
    return prefix.parent / f"{prefix.name}.{ext}"


def write_sweep_report(result: SweepResult, out: str | Path, title: str = "") -> dict[str, Path]:
    """``<out>.json`` (config, summary, every record), ``<out>.md`` (the table) and ``<out>.png`` (error vs m, log
    axis, shaded confidence intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: output_path(out, ext) for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result.to_json(), indent=1))
    paths["md"].write_text(sweep_markdown(result, title))
    rows = result.summary()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in result.config["classifiers"]:
        mine = [r for r in rows if r["classifier"] == name]
        m = np.array([r["m"] for r in mine])
        mean = np.array([r["mean_error"] for r in mine])
        half = np.array([r["ci_half_width"] for r in mine])
        ax.plot(m, 100 * mean, marker="o", label=name)
        ax.fill_between(m, 100 * (mean - half), 100 * (mean + half), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("training samples m")
    ax.set_ylabel("test error (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------- command
class _KNN:
    """The family's weighted kNN as a ``fit``/``predict`` classifier, for the sweep."""

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07):
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def fit(self, X, y):
        self.X, self.y = torch.from_numpy(np.asarray(X, np.float32)), torch.from_numpy(np.asarray(y))
        return self

    def predict(self, X):
        from zoo.ssl.evaluation import weighted_knn_predict

        scores = weighted_knn_predict(torch.from_numpy(np.asarray(X, np.float32)), self.X, self.y, self.num_classes,
                                      self.k, self.temperature)
        return scores.argmax(1).numpy()


def add_source_arguments(parser: argparse.ArgumentParser):
    """The bank options, shared by the commands that build banks (``zoo.gen_vs_dis_nb.study``, ``zoo.rankme``);
    returns the group of the mutually exclusive sources, for a command to add its own."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a zoo SSL run's checkpoint (runs/<name>/checkpoints/*.ckpt)")
    source.add_argument("--random-init", metavar="CONFIG",
                        help="the untrained module of an experiment file or run config (with --seed)")
    source.add_argument("--encoder", help="a timm encoder name, random init (with --seed) unless --pretrained")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of --random-init / --encoder")
    parser.add_argument("--pretrained", action="store_true", help="the hub's weights for --encoder (needs internet)")
    parser.add_argument("--cifar-stem", action="store_true", help="--encoder with the 3x3 stem for 32x32 images")
    parser.add_argument("--config", default=None, help="the run's config (default: config.yaml beside checkpoints/)")
    parser.add_argument("--dataset", default="cifar10_subset")
    parser.add_argument("--layer", choices=("backbone", "projector"), default="backbone")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rebuild", action="store_true", help="extract again even when the bank is cached")
    return source


def bank_from_args(args) -> FeatureBank:
    return feature_bank(args.dataset, checkpoint=args.checkpoint, encoder=args.encoder, random_init=args.random_init,
                        seed=args.seed, layer=args.layer, config=args.config, pretrained=args.pretrained,
                        cifar_stem=args.cifar_stem, batch_size=args.batch_size, device=args.device,
                        rebuild=args.rebuild)


def source_name(args) -> str:
    """A short name of the bank source for output files."""
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        return f"{checkpoint.parent.parent.name}_{checkpoint.stem}"
    if args.random_init:
        return f"{Path(args.random_init).stem}_init_seed{args.seed}"
    return f"{args.encoder}_seed{args.seed}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Extract features into a cached bank and evaluate them offline.")
    add_source_arguments(parser)
    parser.add_argument("--study", choices=("probe", "sample_efficiency"), default="probe",
                        help="probe: linear probe, kNN and RankMe; sample_efficiency: linear probe and kNN error "
                             "against the number of labelled samples (naive Bayes vs logistic regression: "
                             "python -m zoo.gen_vs_dis_nb.study)")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the linear probe")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100, 200, 500, 1000, 2000, 5000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="output prefix for .json/.md(/.png); default under runs/bank/")
    args = parser.parse_args(argv)

    bank = bank_from_args(args)
    name = source_name(args)
    out = Path(args.out or f"runs/bank/{name}_{args.dataset}_{args.layer}_{args.study}")
    if args.study == "probe":
        result = {"bank": str(bank.path), "dim": bank.dim, "linear_probe": linear_probe(bank, args.C),
                  "knn_accuracy": knn_accuracy(bank), "rankme": rankme_of(bank)}
        table = ("| source | dataset | layer | dim | linear probe acc (%) | kNN acc (%) | RankMe |\n"
                 "|---|---|---|---|---|---|---|\n"
                 f"| {name} | {args.dataset} | {args.layer} | {bank.dim} | "
                 f"{100 * result['linear_probe']['accuracy']:.2f} | {100 * result['knn_accuracy']:.2f} | "
                 f"{result['rankme']:.1f} |\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        output_path(out, "json").write_text(json.dumps(result, indent=1))
        output_path(out, "md").write_text(table)
        print(table)
        print(f"wrote {output_path(out, 'json')} and {output_path(out, 'md')}")
        return
    from sklearn.linear_model import LogisticRegression

    classifiers = {"logistic_regression": lambda: LogisticRegression(C=args.C, max_iter=1000),
                   "knn": lambda: _KNN(bank.num_classes)}
    result = sample_size_sweep(bank, classifiers, args.sizes, args.repeats, scaling="standard")
    paths = write_sweep_report(result, out, title=f"{name} on {args.dataset} ({args.layer})")
    print(sweep_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
