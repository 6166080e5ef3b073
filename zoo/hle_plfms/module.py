"""PL-FMS: online continual learning on hierarchical label expansion (Lee, Jung, Choi & Chun, ICCV 2023; official
code ``Hyun1A/HLE``, ``single_depth/methods/pl_fms.py`` on the i-Blurry/CLIB code base).

A shared backbone with a coarse and a fine head learns from one pass over a stream whose labels start coarse and
expand to fine (``data.py``). Every new sample enters a rehearsal memory of fixed size at once; each step trains on
the current chunk of new samples plus memory samples (``batch_size`` in all), ``online_iter`` steps per new sample.

- PL (hierarchy-aware pseudo-labels): a sample with a fine label f also learns the coarse head on parent(f); a
  sample with a coarse label c learns the fine head on ``argmax_{f in children(c)} z_fine[f]`` when the model is
  confident (``softmax(z_fine)[f] > pseudo_threshold``, 0.75). Loss per sample: ``CE(z_level, y) + lambda * CE(z_other,
  y_pseudo)``, summed over the batch and divided by its size.
- Memory (official ``samplewise_importance_memory``): when full, the class (coarse or fine) with the most memory
  samples, counting the incoming one, loses the sample of least importance ``s_i``; every ``importance_period``
  steps ``Delta = mean(L_now - L_prev)`` over the memory's loss (true *and* pseudo labels) and each sample trained
  on since gets ``s_i -= (1 - ema) (Delta - mean_j s_j / n)`` (CLIB's loss-decrease credit).
- FMS (flexible memory sampling, official ``online_train``): a stream sample of class k enters the batch with
  probability ``min(1, (n_seen - n_first(k)) / (N / K))`` (N stream length, K classes seen); memory samples, drawn
  uniformly, fill the batch to ``batch_size`` (the compensation).
- Anytime evaluation: accuracy per level on the test images of the classes seen so far; A_AUC = mean over the
  evaluations (official ``main.py`` ``summary``), final accuracy = the last evaluation.

``memory_update="reservoir"``, ``pseudo_labels=False``, ``flexible_sampling=False`` is the official ER baseline.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import SumMetric

from zoo.core.distributed import concat_all_gather
from zoo.core.module import ZooModule

__all__ = ["HierarchicalNet", "PLFMS", "RehearsalMemory", "anytime_auc", "fms_keep_probability",
           "hierarchical_targets"]

MASKED = -1e9  # logit of a class not seen yet (the official heads grow; masking is the same softmax)


class HierarchicalNet(nn.Module):
    """A backbone's pooled features into a coarse and a fine linear head (official ``fc_sup`` / ``fc_sub``)."""

    def __init__(self, backbone: nn.Module, num_coarse: int, num_fine: int):
        super().__init__()
        if hasattr(backbone, "classifier"):
            backbone.classifier = nn.Identity()  # the heads below replace it
        self.backbone = backbone
        self.coarse_head = nn.Linear(backbone.num_features, num_coarse)
        self.fine_head = nn.Linear(backbone.num_features, num_fine)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.features(x) if hasattr(self.backbone, "features") else self.backbone(x)
        return self.coarse_head(features), self.fine_head(features)


def anytime_auc(accuracies: list[float] | torch.Tensor) -> float:
    """A_AUC = sum_i acc(i dn) dn / (k dn): the mean of the accuracies measured every ``dn`` samples."""
    accuracies = torch.as_tensor(accuracies, dtype=torch.float64)
    return float(accuracies.mean()) if len(accuracies) else 0.0


def fms_keep_probability(first_seen: torch.Tensor, seen: int, stream_length: int, classes_seen: int) -> torch.Tensor:
    """FMS: a stream sample of a class first seen at ``first_seen`` is kept with ``min(1, (seen - first_seen) /
    (stream_length / classes_seen))``: the newest classes' stream samples are held back, memory fills in."""
    return ((seen - first_seen).double() / (stream_length / classes_seen)).clamp(max=1.0)


def hierarchical_targets(labels: torch.Tensor, levels: torch.Tensor, parent: torch.Tensor, fine_seen: torch.Tensor,
                         fine_logits: torch.Tensor, threshold: float, weight: float, pseudo: bool):
    """Per sample: (coarse target, coarse weight, fine target, fine weight). A true label has weight 1, a pseudo
    label ``weight`` (0 without PL): the coarse one of a fine label is its parent; the fine one of a coarse label
    is the most likely *seen child* of it, kept when its probability among all seen fine classes > ``threshold``."""
    coarse_target = torch.where(levels == 0, labels, parent[labels.clamp(max=len(parent) - 1)].clamp(min=0))
    coarse_weight = torch.where(levels == 0, 1.0, weight * pseudo * (parent[labels.clamp(max=len(parent) - 1)] >= 0))
    probs = fine_logits.float().masked_fill(~fine_seen, MASKED).softmax(-1)
    children = fine_seen & (parent[None, :] == labels[:, None])  # (B, F): seen children of each coarse label
    child_probs = probs.masked_fill(~children, -1.0)
    confidence, child = child_probs.max(-1)
    pseudo_ok = (levels == 0) & (confidence > threshold)
    fine_target = torch.where(levels == 1, labels, child)
    fine_weight = torch.where(levels == 1, 1.0, weight * pseudo * pseudo_ok.float())
    return coarse_target, coarse_weight.float(), fine_target, fine_weight.float()


class RehearsalMemory(nn.Module):
    """A fixed-size episodic memory: raw images, (label, level) with class id ``label + level * num_coarse``, and
    CLIB's importance bookkeeping. Every field is a buffer, so it is in every checkpoint (exact resume)."""

    def __init__(self, size: int, image_shape: tuple[int, ...], num_coarse: int):
        super().__init__()
        self.size, self.num_coarse = size, num_coarse
        self.register_buffer("images", torch.zeros(size, *image_shape, dtype=torch.uint8))
        for name in ("labels", "levels", "inserted_at"):
            self.register_buffer(name, torch.zeros(size, dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("score", torch.zeros(size, dtype=torch.float64))  # official others_loss_decrease
        self.register_buffer("prev_loss", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("loss_valid", torch.zeros(size, dtype=torch.bool))  # not replaced since measured
        self.register_buffer("draws", torch.zeros(size, dtype=torch.long))  # times trained on since measured

    def __len__(self) -> int:
        return int(self.count)

    def class_ids(self) -> torch.Tensor:
        n = len(self)
        return self.labels[:n] + self.levels[:n] * self.num_coarse

    def eviction_slot(self, new_class: int, first_seen: torch.Tensor) -> int:
        """The slot to overwrite: the largest class (with the new sample; earliest-seen class on a tie, the official
        list order) loses its least important sample (earliest inserted on a tie)."""
        ids = self.class_ids()
        counts = torch.bincount(ids, minlength=len(first_seen))
        counts[new_class] += 1
        largest = (counts == counts.max()).nonzero().flatten()
        victim_class = largest[first_seen[largest].argmin()]
        slots = (ids == victim_class).nonzero().flatten()
        scores = self.score[slots]
        tied = slots[scores == scores.min()]
        return int(tied[self.inserted_at[tied].argmin()])

    def write(self, slot: int, image, label: int, level: int, position: int) -> None:
        """Store a sample; its importance starts at the mean of its class's others (all samples' if none)."""
        new_class = label + level * self.num_coarse
        replacing = slot < len(self)
        all_mean = self.score[: len(self)].mean() if len(self) else torch.zeros((), dtype=torch.float64)
        self.images[slot], self.labels[slot], self.levels[slot], self.inserted_at[slot] = image, label, level, position
        self.count.fill_(max(len(self), slot + 1))
        same = (self.class_ids() == new_class).nonzero().flatten()
        same = same[same != slot]
        self.score[slot] = self.score[same].mean() if len(same) else (all_mean if replacing else 0.0)
        self.loss_valid[slot], self.draws[slot] = False, 0

    def credit(self, loss_now: torch.Tensor, ema: float) -> None:
        """CLIB's update after measuring the memory's per-sample loss ``loss_now``."""
        n = len(self)
        valid = self.loss_valid[:n]
        delta = (loss_now - self.prev_loss[:n])[valid].mean() if valid.any() else loss_now.new_zeros(())
        used = self.draws[:n] > 0
        if used.any():
            draws = self.draws[:n].double()
            mean_score = (self.score[:n] * draws).sum() / draws.sum()  # mean over draws, repeats included
            self.score[:n][used] -= (1 - ema) * (delta - mean_score / draws.sum())
        self.prev_loss[:n], self.loss_valid[:n], self.draws[:n] = loss_now, True, 0


class PLFMS(ZooModule):
    """PL-FMS, and with its three switches off the ER baseline.

    Args:
        network: a :class:`HierarchicalNet`.
        memory_size: episodic memory (official CIFAR-100 ``MEM_SIZE=2000``).
        batch_size: global training batch, stream + memory (official ``BATCHSIZE=16``).
        memory_update: ``importance`` (PL's loss-decrease eviction) or ``reservoir`` (ER).
        pseudo_labels: hierarchy-aware pseudo-labels (PL); ``pseudo_threshold`` / ``pseudo_weight`` as the
            official scripts' ``TAU=0.75`` / ``LAMB=1.0``.
        flexible_sampling: FMS; off, every new sample is in the batch and memory fills the rest (ER).
        importance_period, importance_ema: CLIB's ``imp_update_period=5`` and ``ema_ratio=0.9``.
        image_shape: the shape of one stored image.
        Optimiser defaults: Adam, lr 3e-4, no weight decay, constant (official ``adam``, ``LR=3e-4``).
    """

    expected_metrics = ("val/aauc_fine", "val/aauc_coarse", "val/acc_fine", "val/acc_coarse")

    def __init__(self, network: HierarchicalNet, memory_size: int = 2000, batch_size: int = 16,
                 memory_update: Literal["importance", "reservoir"] = "importance", pseudo_labels: bool = True,
                 flexible_sampling: bool = True, pseudo_threshold: float = 0.75, pseudo_weight: float = 1.0,
                 importance_period: int = 5, importance_ema: float = 0.9, image_shape: tuple[int, ...] = (3, 32, 32),
                 optimizer: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=ema_decay, **base)
        if memory_update not in ("importance", "reservoir"):
            raise ValueError(f"memory_update={memory_update!r}; use 'importance' or 'reservoir'")
        self.memory_size, self.batch_size, self.memory_update = memory_size, batch_size, memory_update
        self.pseudo_labels, self.flexible_sampling = pseudo_labels, flexible_sampling
        self.pseudo_threshold, self.pseudo_weight = pseudo_threshold, pseudo_weight
        self.importance_period, self.importance_ema = importance_period, importance_ema
        num_coarse, num_fine = network.coarse_head.out_features, network.fine_head.out_features
        self.memory = RehearsalMemory(memory_size, tuple(image_shape), num_coarse)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # stream samples observed
        self.register_buffer("first_seen", torch.full((num_coarse + num_fine,), -1, dtype=torch.long))
        self.register_buffer("parent", torch.full((num_fine,), -1, dtype=torch.long))  # learnt from fine samples
        self.accuracy_history: list[tuple[float, float, float]] = []  # (coarse, coarse head, fine) per evaluation
        self.counts = nn.ModuleDict({k: SumMetric() for k in ("coarse", "coarse_head", "coarse_n", "fine", "fine_n")})

    # ------------------------------------------------------------------ state
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.stream_length = dm.stream_length
        self.register_buffer("mean", dm.mean.float(), persistent=False)
        self.register_buffer("std", dm.std.float(), persistent=False)

    @property
    def num_coarse(self) -> int:
        return self.memory.num_coarse

    def seen_mask(self, level: int) -> torch.Tensor:
        ids = self.first_seen[: self.num_coarse] if level == 0 else self.first_seen[self.num_coarse :]
        return ids >= 0

    @property
    def zero_grad_parameters(self) -> tuple[str, ...]:
        """A head whose level has no class in the stream yet gets no gradient (the official head does not exist)."""
        return tuple(f"network.{name}_head." for level, name in enumerate(("coarse", "fine"))
                     if not self.seen_mask(level).any())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["accuracy_history"] = self.accuracy_history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.accuracy_history = list(checkpoint.get("accuracy_history", []))

    # ------------------------------------------------------------------ the stream
    def observe(self, image, label: int, level: int, parent: int, position: int, generator) -> None:
        """A new stream sample (official ``online_step``): note its class and parent, then update the memory."""
        self.seen += 1
        class_id = label + level * self.num_coarse
        if self.first_seen[class_id] < 0:
            self.first_seen[class_id] = self.seen  # official iter_encountered_cls = n_count_num
        if level == 1:
            self.parent[label] = parent
        if len(self.memory) < self.memory_size:
            self.memory.write(len(self.memory), image, label, level, position)
        elif self.memory_update == "importance":
            self.memory.write(self.memory.eviction_slot(class_id, self.first_seen), image, label, level, position)
        else:  # reservoir: official ER ``reservoir_memory``
            slot = int(torch.randint(0, int(self.seen), (), generator=generator))
            if slot < self.memory_size:
                self.memory.write(slot, image, label, level, position)

    def synced_generator(self) -> torch.Generator:
        """One generator per step, identical on every process: the batch is built from the global chunk the same
        way for any number of processes, each then training on its share of the rows."""
        return torch.Generator().manual_seed(torch.initial_seed() % 2**31 * 1_000_003 + self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        keys = ("idx", "image", "label", "level", "parent")
        chunk = {k: concat_all_gather(batch[k]) for k in keys}
        order = chunk["idx"].argsort()
        chunk = {k: v[order].cpu() for k, v in chunk.items()}
        g = self.synced_generator()
        for i in (chunk["idx"] >= int(self.seen)).nonzero().flatten().tolist():  # not yet in the memory
            self.observe(chunk["image"][i], *(int(chunk[k][i]) for k in ("label", "level", "parent", "idx")), g)

        images, labels, levels, keep = self.compose_batch(chunk, g)
        images = self.augment(images, g)

        rank, world = self.global_rank, self.trainer.world_size  # each process trains on its share of the rows
        coarse_logits, fine_logits = self.network(self.normalise(images[rank::world]))
        loss = self.hierarchical_loss(coarse_logits, fine_logits, labels[rank::world], levels[rank::world])
        loss = loss.sum() * world / len(images)  # DDP averages: the sum over the global batch / its size
        self.log_dict({"train/loss": loss, "train/stream_kept": keep.float().mean(),
                       "train/memory_size": float(len(self.memory))}, prog_bar=True)
        return loss

    def compose_batch(self, chunk: dict, generator: torch.Generator):
        """The global training batch: the chunk's new samples (those FMS keeps), then uniform memory samples up to
        ``batch_size`` (official ``online_train``). Returns images, labels, levels and the FMS mask."""
        keep = torch.ones(len(chunk["idx"]), dtype=torch.bool)
        if self.flexible_sampling and self.seen > len(chunk["idx"]):  # official: after the first chunk
            class_ids = chunk["label"] + chunk["level"] * self.num_coarse
            p = fms_keep_probability(self.first_seen[class_ids].cpu(), int(self.seen), self.stream_length,
                                     int((self.first_seen >= 0).sum()))
            keep = torch.rand(len(p), generator=generator, dtype=torch.float64) <= p
        n_memory = min(len(self.memory), self.batch_size - int(keep.sum()))
        slots = torch.randperm(len(self.memory), generator=generator)[:n_memory].to(self.memory.images.device)
        self.memory.draws[slots] += 1
        return (torch.cat([chunk["image"][keep].to(slots.device), self.memory.images[slots]]),
                torch.cat([chunk["label"][keep].to(slots.device), self.memory.labels[slots]]),
                torch.cat([chunk["level"][keep].to(slots.device), self.memory.levels[slots]]), keep)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.memory_update == "importance" and self.global_step % self.importance_period == 0 and len(self.memory):
            self.memory.credit(self.memory_loss(), self.importance_ema)

    # ------------------------------------------------------------------ losses
    def hierarchical_loss(self, coarse_logits, fine_logits, labels, levels) -> torch.Tensor:
        """Per-sample ``w_c CE(z_coarse, y_c) + w_f CE(z_fine, y_f)`` over the seen classes (float32 logits)."""
        coarse_t, coarse_w, fine_t, fine_w = hierarchical_targets(
            labels, levels, self.parent, self.seen_mask(1), fine_logits.detach(), self.pseudo_threshold,
            self.pseudo_weight, self.pseudo_labels)
        coarse = F.cross_entropy(coarse_logits.float().masked_fill(~self.seen_mask(0), MASKED), coarse_t,
                                 reduction="none")
        fine = F.cross_entropy(fine_logits.float().masked_fill(~self.seen_mask(1), MASKED), fine_t, reduction="none")
        return coarse_w * coarse + fine_w * fine

    @torch.no_grad()
    def memory_loss(self, chunk: int = 512) -> torch.Tensor:
        """Every memory sample's loss on its true and pseudo labels, unaugmented, in eval mode (official
        ``samplewise_loss_update``)."""
        was_training = self.network.training
        self.network.eval()
        n, losses = len(self.memory), []
        for start in range(0, n, chunk):
            images = self.memory.images[start : min(start + chunk, n)]
            logits = self.network(self.normalise(images))
            losses.append(self.hierarchical_loss(*logits, self.memory.labels[start : start + len(images)],
                                                 self.memory.levels[start : start + len(images)]))
        self.network.train(was_training)
        return torch.cat(losses).double()

    # ------------------------------------------------------------------ images
    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
        """Random crop with ``pad`` px zero padding and horizontal flip (the official base train transform)."""
        n, _, h, w = images.shape
        padded = F.pad(images, (pad, pad, pad, pad))
        top, left = (torch.randint(0, 2 * pad + 1, (2, n), generator=generator)).tolist()
        flip = (torch.rand(n, generator=generator) < 0.5).tolist()
        out = torch.stack([padded[i, :, t : t + h, l : l + w] for i, (t, l) in enumerate(zip(top, left))])
        return torch.where(torch.tensor(flip, device=images.device)[:, None, None, None], out.flip(-1), out)

    # ------------------------------------------------------------------ anytime evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        coarse_logits, fine_logits = self.network(self.normalise(batch["image"]))
        coarse_seen, fine_seen = self.seen_mask(0), self.seen_mask(1)
        coarse_pred = coarse_logits.float().masked_fill(~coarse_seen, MASKED).argmax(-1)
        fine_pred = fine_logits.float().masked_fill(~fine_seen, MASKED).argmax(-1)
        coarse, fine = batch["coarse"], batch["fine"]
        head_right = (coarse_pred == coarse) & coarse_seen.any()
        # official ``evaluation``: a coarse answer is right from either head once the fine head has 2+ classes
        via_fine = (self.parent[fine_pred] == coarse) & (fine_seen.sum() > 1)
        coarse_known = coarse_seen[coarse] | (self.parent[fine_seen.nonzero().flatten()][:, None] == coarse).any(0)
        self.counts["coarse"].update(((head_right | via_fine) & coarse_known).sum())
        self.counts["coarse_head"].update((head_right & coarse_known).sum())
        self.counts["coarse_n"].update(coarse_known.sum())
        self.counts["fine"].update(((fine_pred == fine) & fine_seen[fine]).sum())
        self.counts["fine_n"].update(fine_seen[fine].sum())

    def on_validation_epoch_end(self) -> None:
        totals = {k: float(m.compute()) for k, m in self.counts.items()}
        for m in self.counts.values():
            m.reset()
        accuracy = (totals["coarse"] / max(totals["coarse_n"], 1), totals["coarse_head"] / max(totals["coarse_n"], 1),
                    totals["fine"] / max(totals["fine_n"], 1))  # 0 before a level has a class (official)
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.accuracy_history.append(accuracy)  # the anytime curve; a final trainer.validate only reads it
        history = self.accuracy_history or [accuracy]
        self.log_dict({"val/acc_coarse": accuracy[0], "val/acc_coarse_head": accuracy[1], "val/acc_fine": accuracy[2],
                       "val/aauc_coarse": anytime_auc([a[0] for a in history]),
                       "val/aauc_coarse_head": anytime_auc([a[1] for a in history]),
                       "val/aauc_fine": anytime_auc([a[2] for a in history])}, sync_dist=False)
