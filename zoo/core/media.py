"""Media for W&B: images, masks and boxes are drawn only where someone will look at them."""
from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger

__all__ = ["wandb_loggers"]


def wandb_loggers(trainer) -> list[WandbLogger]:
    """The W&B loggers that should receive media now: on rank 0 only, never during the sanity check, none when
    the run has no W&B logger (tests, ``--trainer.logger=false``)."""
    if trainer is None or not trainer.is_global_zero or trainer.sanity_checking:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
