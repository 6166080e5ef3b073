"""The checkpoints a RankMe study evaluates: the run's encoder at fixed steps, every one kept."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["StudyCheckpoints"]


class StudyCheckpoints(ModelCheckpoint):
    """Keeps a checkpoint every ``every_n_steps`` optimizer steps, as ``<run>/study_checkpoints/step=NNNNNN.ckpt``
    (the run's ``last.ckpt`` is overwritten as training goes on, so it cannot serve as the study's points)."""

    def __init__(self, every_n_steps: int = 100, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, filename="step={step:06d}", every_n_train_steps=every_n_steps,
                         save_top_k=-1, save_last=False, auto_insert_metric_name=False, enable_version_counter=False)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:  # beside checkpoints/ in the run directory, whatever the logger
            self.dirpath = str(Path(trainer.default_root_dir) / "study_checkpoints")
        super().setup(trainer, pl_module, stage)
