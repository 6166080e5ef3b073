"""Self-supervised learning for large-scale item recommendations (Yao et al., CIKM 2021), on a two-tower retrieval
model. There is no official code (Google internal): everything follows the paper's text, cited per part.

One training step sees two batches (``zoo.recsys.data.InteractionsDataModule``):

1. Main task (Sec. 2 / 4, after Yi et al., RecSys 2019): (query, positive item) pairs drawn from the training
   interactions. Query and item towers give L2-normalised embeddings u, v; the batch softmax scores every query
   against every in-batch item, ``s_ij = <u_i, v_j> / tau_main``, and removes the sampling bias of in-batch
   negatives with the log-Q correction ``s^c_ij = s_ij - log p_j``, p_j = the probability that item j is in a batch
   (estimated from training frequency; popular items, over-sampled as negatives, are pushed down, rare ones up).
   ``L_main = -1/N sum_i log softmax_j(s^c_ij)[j = i]``.
2. SSL task (Sec. 3): items drawn uniformly from the item corpus (Sec. 3.4, "heterogeneous sample distribution":
   not the popularity-skewed training distribution). Each item gets two views by complementary feature masking
   (CFM, or RFM) and multi-valued feature dropout (``masking.py``); both go through the *same* item tower (so the
   SSL task shapes the embeddings used for retrieval) and a small SSL head, and
   ``L_ssl = -1/N sum_i log [exp(s(z'_i, z''_i) / tau) / sum_j exp(s(z'_i, z''_j) / tau)]`` with cosine s.
3. ``L = L_main + alpha * L_ssl`` (Sec. 3.4). ``ssl_weight=0`` is the paper's baseline: no SSL task at all.

Evaluation: recall@{10, 50, 100} over the full item corpus on the test split, training positives excluded, overall
and on the long-tail slice (``zoo.recsys.evaluation``). Losses run in float32 (embeddings upcast before the
normalisation), so bf16 autocast only touches the towers.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.distributed import gather_with_grad, rank_and_world
from zoo.core.module import ZooModule
from zoo.recsys.evaluation import RecallAtK, long_tail_items
from zoo.recsys.towers import FeatureEmbedding, Tower

from .masking import correlated_groups, correlated_masks, drop_values, feature_mutual_information, random_masks

__all__ = ["SSLTwoTower", "batch_softmax_loss", "ssl_infonce_loss"]


def _gathered_labels(local: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    """Indices of this rank's rows among the rows gathered from every rank (rank order)."""
    rank = rank_and_world()[0] if gathered.shape[0] != local.shape[0] else 0
    return torch.arange(local.shape[0], device=local.device) + rank * local.shape[0]


def batch_softmax_loss(queries: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor | None,
                       temperature: float) -> torch.Tensor:
    """In-batch softmax with log-Q correction (Yi et al. 2019, Eq. 3; Yao et al. 2021, Sec. 2): row i's positive is
    item i; ``items`` and ``log_q`` may hold other ranks' rows too (gathered), this rank's at its offset."""
    logits = queries.float() @ items.float().T / temperature
    if log_q is not None:
        logits = logits - log_q.float()[None, :]
    return F.cross_entropy(logits, _gathered_labels(queries, items))


def ssl_infonce_loss(view1: torch.Tensor, view2: torch.Tensor, view2_all: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """The paper's SSL loss (Sec. 3.1): cosine similarity / tau of view 1 of item i against view 2 of every item of
    the batch (``view2_all``: gathered from every rank), positive = view 2 of item i; one direction, as written."""
    z1, z2 = F.normalize(view1.float(), dim=-1), F.normalize(view2_all.float(), dim=-1)
    return F.cross_entropy(z1 @ z2.T / temperature, _gathered_labels(view1, view2_all))


class SSLTwoTower(ZooModule):
    """Two-tower retrieval with the paper's SSL regulariser. The towers are built in :meth:`setup` from the data
    module's feature schema (table sizes depend on the data), before the optimiser.

    Args (the paper's value where it states one; Sec. 5 tunes most of them per dataset, see the README):
        embedding_dim: width of every feature embedding (ours: MovieLens-sized).
        hidden: hidden widths of both towers' MLPs (ours).
        output_dim: tower output (retrieval embedding) width (ours).
        temperature: batch-softmax temperature on the normalised embeddings (Yi et al. 2019 use 0.05).
        logq_correction: subtract log p_j from every logit (Yi et al. 2019; Yao et al. 2021 Sec. 2).
        ssl_weight: alpha in L = L_main + alpha * L_ssl (paper tunes it; 0 = no SSL, the baseline).
        ssl_temperature: tau of the SSL InfoNCE (paper tunes it; 0.1 here).
        masking: ``correlated`` (CFM, the paper's method) or ``random`` (RFM, its ablation).
        feature_dropout: dropout rate of the values of multi-valued features in each SSL view.
        ssl_head_dim: width of the SSL head (one linear layer on the item tower's output) before the cosine.
        tail_share: share of training interactions held by the tail items evaluated as the long-tail slice.
        recall_ks: the K of recall@K (the issue's 10, 50, 100).
        optimizer, lr, weight_decay, lr_schedule: AdamW 1e-3, constant, no decay (the paper uses Adagrad, which the
            base does not offer; see the README). ema_decay: none, the method keeps no average of its weights.
    """

    def __init__(self, embedding_dim: int = 32, hidden: tuple[int, ...] = (128,), output_dim: int = 64,
                 temperature: float = 0.05, logq_correction: bool = True, ssl_weight: float = 1.0,
                 ssl_temperature: float = 0.1, masking: Literal["correlated", "random"] = "correlated",
                 feature_dropout: float = 0.1, ssl_head_dim: int = 64, tail_share: float = 0.2,
                 recall_ks: tuple[int, ...] = (10, 50, 100), optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0, lr_schedule: Literal["cosine", "constant"] = "constant",
                 ema_decay: float | None = None, **base):
        super().__init__(nn.ModuleDict(), optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, ema_decay=ema_decay, **base)
        self.embedding_dim, self.hidden, self.output_dim = embedding_dim, tuple(hidden), output_dim
        self.temperature, self.logq_correction = temperature, logq_correction
        self.ssl_weight, self.ssl_temperature, self.masking = ssl_weight, ssl_temperature, masking
        self.feature_dropout, self.ssl_head_dim, self.tail_share = feature_dropout, ssl_head_dim, tail_share
        self.recall_ks = tuple(recall_ks)
        self.expected_metrics = tuple(f"val/{p}recall@{k}" for p in ("", "tail_") for k in self.recall_ks)
        if masking not in ("correlated", "random"):
            raise ValueError(f"masking must be 'correlated' (CFM) or 'random' (RFM), not {masking!r}")

    # ------------------------------------------------------------------------------------------ the model
    def setup(self, stage: str) -> None:
        if "item" in self.network:
            return
        data = self.trainer.datamodule
        data.setup(stage)
        schema, counts = data.schema, data.data.item_counts()
        self.network["query"] = Tower(FeatureEmbedding(schema["user"], self.embedding_dim), self.embedding_dim,
                                      self.hidden, self.output_dim)
        self.network["item"] = Tower(FeatureEmbedding(schema["item"], self.embedding_dim, maskable=self.uses_ssl),
                                     self.embedding_dim, self.hidden, self.output_dim)
        if self.uses_ssl:
            self.network["ssl_head"] = nn.Linear(self.output_dim, self.ssl_head_dim)
            mutual_information = feature_mutual_information(data.data.item_features)
            self.register_buffer("mutual_information", torch.from_numpy(mutual_information), persistent=False)
            self.register_buffer("cfm_groups", correlated_groups(mutual_information), persistent=False)
        self.multi_valued = tuple(name for name, codes in data.items.items() if codes.shape[1] > 1)
        # p_j: item j's share of training interactions, the probability that a drawn interaction's item is j (the
        # batch-inclusion probability up to the factor B, a constant shift of every logit that softmax ignores)
        counts_t = torch.from_numpy(counts).double()
        self.register_buffer("log_q", (counts_t.clamp(min=1) / counts_t.sum()).log().float(), persistent=False)
        self.register_buffer("train_positives", data.interaction_matrix("train"), persistent=False)
        self.register_buffer("test_positives", data.interaction_matrix("test"), persistent=False)
        self.catalog = data.items
        self.recall = RecallAtK(torch.from_numpy(long_tail_items(counts, self.tail_share)), self.recall_ks)

    @property
    def uses_ssl(self) -> bool:
        return self.ssl_weight > 0

    def embed_items(self, features: dict, keep: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.network["item"](features, keep).float(), dim=-1)

    def embed_queries(self, features: dict) -> torch.Tensor:
        return F.normalize(self.network["query"](features).float(), dim=-1)

    # ------------------------------------------------------------------------------------------ training
    def main_loss(self, batch: dict) -> torch.Tensor:
        queries, items = self.embed_queries(batch["user"]), self.embed_items(batch["item"])
        log_q = self.log_q[batch["item_id"]] if self.logq_correction else None
        items_all = gather_with_grad(items)
        log_q_all = gather_with_grad(log_q) if log_q is not None else None
        return batch_softmax_loss(queries, items_all, log_q_all, self.temperature)

    def view_masks(self, batch_size: int) -> torch.Tensor:
        """View 1's keep mask (B, k); view 2 keeps the complement."""
        if self.masking == "correlated":
            return correlated_masks(self.cfm_groups, batch_size)
        return random_masks(len(self.network["item"].embedding.names), batch_size, device=self.device)

    def ssl_loss(self, items: dict) -> torch.Tensor:
        """``items``: the item features of the corpus batch."""
        keep = self.view_masks(len(next(iter(items.values()))))
        views = [self.network["ssl_head"](self.network["item"](
            drop_values(items, self.multi_valued, self.feature_dropout), mask)) for mask in (keep, ~keep)]
        return ssl_infonce_loss(views[0], views[1], gather_with_grad(views[1]), self.ssl_temperature)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = main = self.main_loss(batch["interactions"])
        self.log("train/main_loss", main)
        if self.uses_ssl:
            ssl = self.ssl_loss(batch["items"]["item"])
            loss = main + self.ssl_weight * ssl
            self.log("train/ssl_loss", ssl)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ---------------------------------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():
            catalog = {name: codes.to(self.device) for name, codes in self.catalog.items()}
            self.item_bank = self.embed_items(catalog)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        users = batch["idx"]
        scores = self.embed_queries(batch["user"]) @ self.item_bank.T
        self.recall.update(scores, self.train_positives[users], self.test_positives[users])

    def on_validation_epoch_end(self) -> None:
        for name, value in self.recall.compute().items():
            self.log(f"val/{name}", value, prog_bar=name == "recall@50")  # already synchronised
        self.recall.reset()
        del self.item_bank
