"""HIAST: Hard-aware Instance Adaptive Self-Training for unsupervised cross-domain semantic segmentation
(Zhu, Bai, Wang et al., 2023; extends IAST, ECCV 2020), as an *online* variant on the shared mean-teacher host
(``zoo.segda.host.DAFormerSelfTraining``).

Three parts, each a pure function in ``rules.py``:

1. Instance adaptive selector (IAS, :func:`ias_thresholds`): one threshold per class, updated on every batch of
   teacher predictions, theta_c <- beta theta_c + (1 - beta) Quantile(conf. of pixels predicted c,
   1 - alpha theta_c^gamma), capped below 1; a pixel is ignored (255) when its confidence is below the threshold
   of its predicted class (:func:`select_pseudo_labels`). A low ("hard") theta_c keeps a smaller top share.
2. Hard-aware pseudo-label augmentation (:func:`update_class_values`, :func:`hard_classes_and_probabilities`,
   :func:`hard_aware_copy_paste`): a per-class "value" (EMA of the mean confidence of the pixels kept as that
   class); the lowest ``hard_classes`` values are the hard classes; one of them is drawn with p ∝ (1 - value)^2,
   another pseudo-labelled target image holding it is drawn, and *all* its hard-class pixels (image and pseudo
   label) are pasted onto the current target image.
3. Region-adaptive regularisation (:func:`region_adaptive_losses`), on the student's strong-view logits: CE on
   the pseudo-labelled pixels (1.0), KL-to-uniform there (0.1), entropy minimisation on the ignored pixels (1.0)
   and soft-CE consistency to the EMA teacher's weak-view softmax on the ignored pixels (0.5).

Follows the official code (bupt-ai-cz/HIAST @ f2f357a: ``workflows/pseudo_label_generator.py`` ``IASPseudoGenerator``,
``sseg/datasets/preprocessor.py`` ``CopyPaste``, ``sseg/models/segmentors/self_training_segmentor.py``,
``sseg/models/modules/losses.py``, configs ``sl_1.yaml`` + ``hiast_setting.yaml``), constants checked there:
alpha 0.5 (``sl_*.yaml``; the default config's 0.2 is IAST's), beta 0.9, gamma 8, init 0.9, entries >= 1 set to
0.999; the quantile pools the pixels of the whole batch (2 images), with the old threshold inserted as one extra
sample and the confidences rounded to float16; a class absent from the batch keeps its threshold; the updated
thresholds label the same batch, ignore iff confidence < threshold (strict). Class values: EMA 0.99, the first
observation assigned directly, over the *kept* pixels. Hard classes 14 of 19; a source image is drawn uniformly
among those holding the class after dropping the 10 % with the fewest pixels of it. The loss reductions are the
code's: CE is the mean over labelled pixels; the KL and entropy terms are per-pixel means *divided by C* (their
weight tensor has C entries per pixel), the KL term is the cross-entropy to the uniform distribution (no log C
constant); the consistency term is summed and divided by its number of non-zero (pixel, class) entries. An empty
region gives 0 here (NaN in the official code).

The online mapping (the official HIAST is offline: warm-up model -> pseudo-label files -> 8000 iterations -> EMA
model regenerates them, 3 rounds, DeepLab-v2, target-only losses):

- pseudo-labels come from the host's EMA teacher on each step's target crops (host: teacher_mode, momentum ramp),
  and the IAS thresholds and class values are buffers that evolve over the whole run instead of restarting at
  every round; they pool the *global* target batch (all ranks gathered: the same thresholds everywhere);
- the offline pseudo-label files are replaced by a FIFO bank of the last ``bank_size`` target crops with their
  IAS pseudo-labels (per rank, not checkpointed: a resumed run refills it), which is where pasted images come
  from; the hard classes and probabilities use the class values as they stand at that step;
- the official copy-paste loop means to paste from up to 3 images until half of the hard classes are present,
  but it records every hard class as present after the first image, so it always pastes from exactly one image;
  ``max_paste_images = 1`` is that behaviour (the default), 3 gives the loop the paper describes;
- the host's source CE stays (there is no warm-up model online) and HIAST's target losses replace the host's
  ClassMix term; the strong view is the host's colour jitter + blur on top of the weak crop (the official CCA
  draws 3 of 8 photometric ops, jitter and blur among them); the consistency target is the teacher's softmax on
  the copy-pasted weak crop, as the official EMA model sees it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from zoo.segda.host import DAFormerSelfTraining
from zoo.segda.data import IGNORE

from .rules import (gather_pixels, hard_aware_copy_paste, hard_classes_and_probabilities, ias_thresholds,
                    region_adaptive_losses, select_pseudo_labels, update_class_values)

__all__ = ["HIAST"]


# ------------------------------------------------------------------------------------------- the module
class HIAST(DAFormerSelfTraining):
    """HIAST on the DAFormer host. Defaults: the official GTA5 -> Cityscapes round configs.

    Args:
        network: segmentation network (``SegFormerDAFormer`` for the paper setting, ``SmallDAFormer`` on CPU).
        ias_alpha, ias_beta, ias_gamma: IAS's 0.5, 0.9, 8; ias_init: starting threshold (0.9); ias_cap: value
            that replaces thresholds >= 1 (0.999).
        class_value_momentum: EMA of the per-class mean confidence (0.99).
        hard_classes: number of lowest-value classes pasted (14 of Cityscapes' 19).
        max_paste_images: source images per copy-paste (1 = the official code; 3 = the paper's loop).
        paste_drop_fraction: share of holders of a class with its fewest pixels never used as source (0.1).
        bank_size: pseudo-labelled target crops kept to paste from (the official pastes from the whole target set).
        ce_weight, kl_weight, entropy_weight, consistency_weight: 1.0, 0.1, 1.0, 0.5.
        The remaining arguments are the host's (see ``DAFormerSelfTraining``); HIAST has no ImageNet feature
        distance (0 by default here) and no row crop of the pseudo-label weight.
    """

    def __init__(self, network: nn.Module, ias_alpha: float = 0.5, ias_beta: float = 0.9, ias_gamma: float = 8.0,
                 ias_init: float = 0.9, ias_cap: float = 0.999, class_value_momentum: float = 0.99,
                 hard_classes: int = 14, max_paste_images: int = 1, paste_drop_fraction: float = 0.1,
                 bank_size: int = 256, ce_weight: float = 1.0, kl_weight: float = 0.1, entropy_weight: float = 1.0,
                 consistency_weight: float = 0.5, feature_distance_weight: float = 0.0, **host):
        super().__init__(network, pseudo_weight_ignore_top=0, pseudo_weight_ignore_bottom=0,
                         feature_distance_weight=feature_distance_weight, **host)
        self.ias_alpha, self.ias_beta, self.ias_gamma, self.ias_cap = ias_alpha, ias_beta, ias_gamma, ias_cap
        self.class_value_momentum, self.hard_classes = class_value_momentum, hard_classes
        self.max_paste_images, self.paste_drop_fraction, self.bank_size = (
            max_paste_images, paste_drop_fraction, bank_size)
        self.ce_weight, self.kl_weight = ce_weight, kl_weight
        self.entropy_weight, self.consistency_weight = entropy_weight, consistency_weight
        self.register_buffer("class_thresholds", torch.full((self.num_classes,), ias_init, dtype=torch.float64))
        self.register_buffer("class_values", torch.zeros(self.num_classes, dtype=torch.float64))
        self.bank_images: torch.Tensor | None = None  # the latest target crops and their IAS pseudo-labels
        self.bank_labels: torch.Tensor | None = None

    # ------------------------------------------------------------------- instance adaptive selector
    def pseudo_labels(self, target_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher argmax -> IAS update on the global batch -> pseudo-labels with 255 below threshold; the
        weight (only logged by the host) marks the kept pixels."""
        confidence, labels = torch.softmax(self.teacher_logits(target_images).float(), dim=1).max(dim=1)
        all_confidence, all_labels = gather_pixels(confidence, labels)
        self.class_thresholds.copy_(ias_thresholds(self.class_thresholds, all_confidence, all_labels,
                                                   self.ias_alpha, self.ias_beta, self.ias_gamma, self.ias_cap))
        kept = select_pseudo_labels(all_confidence, all_labels, self.class_thresholds)
        self.class_values.copy_(update_class_values(self.class_values, all_confidence, kept,
                                                    self.class_value_momentum))
        pseudo_labels = select_pseudo_labels(confidence, labels, self.class_thresholds)
        return pseudo_labels, (pseudo_labels != IGNORE).float()

    # ------------------------------------------------------------------ hard-aware copy-paste
    def copy_paste_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each target crop gets hard-class pixels from a bank crop; then the batch joins the bank."""
        if self.bank_labels is not None:
            hard, probabilities = hard_classes_and_probabilities(self.class_values, self.hard_classes)
            pasted = [hard_aware_copy_paste(image, label, self.bank_images, self.bank_labels, hard, probabilities,
                                            self.max_paste_images, self.paste_drop_fraction)
                      for image, label in zip(images, labels)]
            self.bank_images = torch.cat([self.bank_images, images])[-self.bank_size:]
            self.bank_labels = torch.cat([self.bank_labels, labels])[-self.bank_size:]
            return torch.stack([p[0] for p in pasted]), torch.stack([p[1] for p in pasted])
        self.bank_images, self.bank_labels = images[-self.bank_size:], labels[-self.bank_size:]
        return images, labels

    # --------------------------------------------------------------- region-adaptive losses
    def mixed_loss(self, source: dict, target_images: torch.Tensor, pseudo_labels: torch.Tensor,
                   pseudo_weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """HIAST's target term in place of the host's ClassMix term: hard-aware copy-paste of target crops, the
        student on their strong view, the teacher's softmax on their weak view, the region-adaptive losses."""
        images, labels = self.copy_paste_batch(target_images.detach(), pseudo_labels)
        teacher_probs = torch.softmax(self.teacher_logits(images).float(), dim=1)
        strong = self.strong(images)
        terms = region_adaptive_losses(self.network(strong), labels, teacher_probs)
        weights = {"ce": self.ce_weight, "kl": self.kl_weight, "entropy": self.entropy_weight,
                   "consistency": self.consistency_weight}
        loss = sum(weights[name] * term for name, term in terms.items())
        if self.global_step % self.log_images_every_n_steps == 0:
            self.log_segmentation("train/hard_copy_paste", strong, {"pseudo_label": labels})
        logs = {f"train/{name}_loss": term for name, term in terms.items()}
        logs.update({"train/target_loss": loss, "train/mean_class_threshold": self.class_thresholds.mean(),
                     "train/changed_label_share": (labels != pseudo_labels).float().mean()})
        return loss, logs
