"""A DAVIS label-propagation probe for any run whose module has a timm ResNet as ``network`` (the ssl hosts)."""
from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from .davis import load_davis2016
from .propagation import DenseFeatures, LabelPropagation
from .study import DEFAULTS, evaluate, frames_tensor

__all__ = ["DavisPropagationProbe"]


class DavisPropagationProbe(Callback):
    """At each validation end (rank 0), propagates DAVIS-2016 masks with the current encoder's stride-8 ``layer3``
    features at CRW's defaults and logs ``val/davis_jf``, ``val/davis_j``, ``val/davis_f``.

    Args:
        sequences: sequence names (None: all 9 of ``val_subset.txt``).
        max_frames: first frames per sequence (keeps the probe in seconds).
        input_height: frame height fed to the encoder.
        context, topk, radius, temperature: the propagation factors (CRW defaults).
    """

    def __init__(self, sequences: list[str] | None = None, max_frames: int | None = 20, input_height: int = 120,
                 context: int = DEFAULTS["context"], topk: int = DEFAULTS["topk"], radius: float = DEFAULTS["radius"],
                 temperature: float = DEFAULTS["temperature"]):
        self.sequences, self.max_frames, self.input_height = sequences, max_frames, input_height
        self.propagation = LabelPropagation(temperature=temperature, topk=topk, radius=radius, context=context)
        self._data = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._data is None:  # fail at start, not after the first training interval, when DAVIS is missing
            self._data = load_davis2016(sequences=self.sequences, max_frames=self.max_frames)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        was_training = pl_module.training
        extractor = DenseFeatures(pl_module.network).to(pl_module.device)
        features = [extractor(frames_tensor(s.frames, self.input_height).to(pl_module.device)).float().cpu()
                    for s in self._data]
        scores = evaluate(self._data, features, self.propagation)
        pl_module.log_dict({"val/davis_jf": scores["J&F"], "val/davis_j": scores["J"], "val/davis_f": scores["F"]},
                           rank_zero_only=True, sync_dist=False)
        pl_module.train(was_training)
