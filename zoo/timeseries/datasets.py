"""Time-series classification sets as ``(N, C, L)`` float32 windows with labels and, where the data has them, the
patient and trial each window comes from.

- UCR/UEA sets (``ECG200``, ``GunPoint``, ``ItalyPowerDemand``, ``ArrowHead``, ``BasicMotions``): the archive's
  official train/test splits, read from ``timeseries/<name>.npz`` (the shared offline folder). They carry **no**
  patient or trial ids, so ``patient_*`` and ``trial_*`` are ``None``: a method's patient/trial levels have nothing
  to contrast on them. (ECG5000 is offline only as its train split, so it is not offered.)
- COMET's medical sets (``AD``, ``PTB``, ``TDBrain``): the official processed layout
  ``comet/<name>/Feature/feature_<ID>.npy`` (a patient's trials, ``[N_r, T, C]``) and ``comet/<name>/Label/label.npy``
  (``[N_p, 2]``: label, patient id), cut into windows as ``utils.split_data_label`` does, each window keeping its
  trial id (one per trial, counted over the patients) and patient id; split by patient as the official notebooks do
  (their validation patients are left out: this zoo reports the last model on the test patients).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoo.core.datasets import MissingDatasetError, data_root, shared_root

__all__ = ["TimeSeriesSet", "load_timeseries", "UCR_SETS", "PAPER_SETS", "window_trials"]

UCR_SETS = ("ECG200", "GunPoint", "ItalyPowerDemand", "ArrowHead", "BasicMotions")


@dataclass(frozen=True)
class PaperSet:
    """How COMET cuts a medical set (``config_files/<name>_Configs.py``, ``<name>_Example.ipynb``)."""
    window: int  # S_TIMESTAMPS
    overlap: float  # S_OVERLAPPING
    how: str  # how to obtain the processed files


_FIGSHARE = ("download the processed {name} set of COMET ({url}), unzip it so that {path}/Feature/feature_<ID>.npy "
             "and {path}/Label/label.npy exist")
PAPER_SETS = {
    "AD": PaperSet(256, 0.5, _FIGSHARE.replace("{url}", "https://figshare.com/ndownloader/files/43196127")),
    "PTB": PaperSet(300, 0.0, _FIGSHARE.replace("{url}", "https://figshare.com/ndownloader/files/43196133")),
    "TDBrain": PaperSet(256, 0.5, "TDBrain is access-restricted: request it at https://brainclinics.com/resources/, "
                                  "run COMET's data_preprocessing/TDBrain notebook and put its output so that "
                                  "{path}/Feature/feature_<ID>.npy and {path}/Label/label.npy exist"),
}


@dataclass
class TimeSeriesSet:
    name: str
    x_train: np.ndarray  # (N, C, L) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    patient_train: np.ndarray | None = None  # (N,) int64, or None where the data has no patients
    trial_train: np.ndarray | None = None

    @property
    def levels(self) -> tuple[str, ...]:
        """The data levels this set really has, coarse to fine."""
        return tuple(level for level, ids in (("patient", self.patient_train), ("trial", self.trial_train))
                     if ids is not None) + ("sample", "observation")


def load_timeseries(name: str) -> TimeSeriesSet:
    if name in UCR_SETS:
        return _ucr(name)
    if name in PAPER_SETS:
        return _paper_set(name)
    raise ValueError(f"unknown time-series set {name!r}; offline: {', '.join(UCR_SETS)}; COMET's: "
                     f"{', '.join(PAPER_SETS)}")


def _find(relative: str, how: str):
    for root in (data_root(), shared_root()):
        if (root / relative).exists():
            return root / relative
    raise MissingDatasetError(f"dataset not found: {(data_root() / relative).resolve()}\n  {how}\n"
                              f"  (searched ZOO_DATA_DIR={data_root()} and {shared_root()})")


def _ucr(name: str) -> TimeSeriesSet:
    path = _find(f"timeseries/{name}.npz", "the UCR/UEA npz files ship in the shared offline data folder "
                 "(shared/data/timeseries, see its SOURCE.md); point ZOO_DATA_DIR at that data folder")
    d = np.load(path)
    return TimeSeriesSet(name, d["x_train"].astype(np.float32), d["y_train"].astype(np.int64),
                         d["x_test"].astype(np.float32), d["y_test"].astype(np.int64), len(d["label_names"]))


def window_trials(trials: np.ndarray, window: int, overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """``(N_r, T, C)`` trials -> ``(N_r * k, C, window)`` windows with a step of ``window * (1 - overlap)`` and the
    index of the trial of each (``utils.split_data``: AD's 1280-step trials give 9 half-overlapping windows)."""
    step = int(window * (1 - overlap))
    starts = range(0, trials.shape[1] - window + 1, step)
    windows = np.stack([trials[:, s:s + window] for s in starts], axis=1)  # N_r x k x window x C
    trial_of = np.repeat(np.arange(len(trials)), len(starts))
    return windows.reshape(-1, window, trials.shape[2]).transpose(0, 2, 1), trial_of


def held_out_patients(name: str, labels: np.ndarray, patients: np.ndarray) -> tuple[set[int], set[int]]:
    """The official notebooks' patient-independent (validation, test) patients."""
    if name == "AD":
        return {17, 18}, {19, 20}
    if name == "TDBrain":
        return {18, 19, 20, 21, 46, 47, 48, 49}, {22, 23, 24, 25, 50, 51, 52, 53}
    healthy, positive = sorted(patients[labels == 0]), sorted(patients[labels == 1])  # PTB: 7 healthy, 21 positive
    return set(healthy[-14:-7]) | set(positive[-42:-21]), set(healthy[-7:]) | set(positive[-21:])


def _paper_set(name: str) -> TimeSeriesSet:
    spec = PAPER_SETS[name]
    folder = f"comet/{name}"
    how = spec.how.format(name=name, path=(data_root() / folder).resolve())
    label_file = _find(f"{folder}/Label/label.npy", how)
    subject = np.load(label_file).astype(np.int64)  # rows in the sorted order of the feature files (load_ad)
    files = sorted((label_file.parents[1] / "Feature").glob("feature_*.npy"))
    validation_ids, test_ids = held_out_patients(name, subject[:, 0], subject[:, 1])
    parts = {"train": ([], [], [], []), "test": ([], [], [], [])}
    trial_count = 0
    for path, (label, patient) in zip(files, subject):
        if patient in validation_ids:  # the official model selection set; not used here (see the README)
            continue
        windows, trial_of = window_trials(np.load(path).astype(np.float32), spec.window, spec.overlap)
        split = parts["test" if patient in test_ids else "train"]
        for column, values in zip(split, (windows, np.full(len(windows), label), np.full(len(windows), patient),
                                          trial_of + trial_count)):
            column.append(values)
        trial_count += int(trial_of.max()) + 1
    train, test = ([np.concatenate(column) for column in parts[s]] for s in ("train", "test"))
    return TimeSeriesSet(name, train[0], train[1], test[0], test[1], int(subject[:, 0].max()) + 1,
                         patient_train=train[2], trial_train=train[3])
