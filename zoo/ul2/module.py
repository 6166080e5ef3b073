"""UL2: Unifying Language Learning Paradigms (Tay et al., ICLR 2023): pre-training on a mixture of denoisers.

Every training window x is handed to one denoiser d ~ Cat(rates) of the mixture (:mod:`zoo.ul2.denoisers`):

    R / X (span corruption, mean span mu, rate r):  inputs = x with each noise span -> one sentinel,
                                                    targets = sentinel_k + span_k, k = 1..n, n = round(r L / mu)
    S (prefix LM):                                  inputs = x[:p], targets = x[p:], p ~ U{1, ..., L-1}

and the mode token of its paradigm ([NLU] = R, [NLG] = X, [S2S] = S) is prepended to the inputs, so that at
inference the same token switches the model into that paradigm. The loss is the cross-entropy of the targets
given the inputs, L = -sum_t log p(y_t | mode, inputs, y_<t) / |y|, for an encoder-decoder (T5) or a decoder-only
model reading ``mode + inputs + targets`` with the loss on the targets only. The causal-LM baseline is the same
module with the single ``causal`` denoiser (whole window = target, no mode token).

Logged: ``train/loss`` and ``train/loss_<denoiser>`` per denoiser; ``val/loss`` / ``val/ppl`` (next-token loss on
held-out text read in S mode), ``val/cloze_acc`` (4-way cloze scored by that likelihood) and ``val/cloze_infill_acc``
(the same cloze scored as an infilled span in R mode).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from zoo.core.metrics import accuracy
from zoo.core.module import ZooModule
from zoo.lm.tiny import byte_tokenizer

__all__ = ["UL2", "Seq2SeqLM", "target_nll"]


class Seq2SeqLM(nn.Module):
    """A T5 encoder-decoder and its tokenizer (``self.model``, ``self.tokenizer``).

    Args:
        pretrained: hub name (``google/ul2``: T5 v1.1 architecture, gated-SiLU, 32 + 32 layers, d_model 4096);
            None = a tiny T5 v1.1 config on the byte tokenizer (ByT5 ids, 125 sentinels).
        random_init: with ``pretrained``, build that architecture and tokenizer with random weights (the paper's
            pre-training from scratch) instead of loading its weights (continued training, as UL2R).
        num_layers, hidden_size, num_heads: the tiny config (encoder and decoder each ``num_layers``).
        dtype: weights' dtype of hub models.
    """

    def __init__(self, pretrained: str | None = None, random_init: bool = False, num_layers: int = 2,
                 hidden_size: int = 128, num_heads: int = 4, dtype: str = "float32"):
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, T5Config, T5ForConditionalGeneration

        if pretrained:
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
            if random_init:
                self.model = T5ForConditionalGeneration(AutoConfig.from_pretrained(pretrained))
            else:
                self.model = T5ForConditionalGeneration.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        else:
            self.tokenizer = byte_tokenizer()
            config = T5Config(vocab_size=len(self.tokenizer), d_model=hidden_size, d_kv=hidden_size // num_heads,
                              d_ff=2 * hidden_size, num_layers=num_layers, num_heads=num_heads,
                              feed_forward_proj="gated-silu", tie_word_embeddings=False, dropout_rate=0.0,
                              pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                              decoder_start_token_id=self.tokenizer.pad_token_id)
            self.model = T5ForConditionalGeneration(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Decoder logits for ``labels`` (teacher forcing; -100 entries become padding in the shifted input)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits


def target_nll(network: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the targets and the mask of target tokens, both (B, T), float32.

    Decoder-only batches (``loss_mask``) score token t+1 from the logits at t; encoder-decoder batches
    (``labels``) score each label. Logits are upcast before the log-softmax (bf16 runs).
    """
    if "labels" in batch:
        logits = network(batch["input_ids"], batch["attention_mask"], batch["labels"]).float()
        mask = batch["labels"] != -100
        nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"].clamp_min(0), reduction="none")
        return nll, mask.float()
    logits = network(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return nll, batch["loss_mask"][:, 1:].float()


class UL2(ZooModule):
    """Pre-training on the mixture of denoisers the data module draws (:class:`zoo.ul2.data.UL2DataModule`).

    Args:
        network: :class:`Seq2SeqLM` (the paper's T5) or :class:`zoo.lm.tiny.CausalLM` (decoder-only); the data
            module lays the examples out for it.
        optimizer, lr, weight_decay, warmup_steps, cosine_cycles: AdamW with warm-up and cosine decay (the paper:
            Adafactor with inverse-square-root decay, which the base does not provide).
    """

    expected_metrics = ("val/loss", "val/ppl", "val/cloze_acc", "val/cloze_infill_acc")

    def __init__(self, network: nn.Module, optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 100, cosine_cycles: float = 0.5, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         cosine_cycles=cosine_cycles, ema_decay=None, **base)
        self.val_nll = MeanMetric()
        self.cloze_acc, self.cloze_infill_acc = accuracy(4), accuracy(4)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, mask = target_nll(self.network, batch)
        loss = (nll * mask).sum() / mask.sum().clamp_min(1)
        self.log("train/loss", loss, prog_bar=True)
        # per-denoiser loss, averaged over that denoiser's target tokens in the batch
        per_example, tokens = (nll * mask).sum(1).detach(), mask.sum(1)
        for name in sorted(set(batch["denoiser"])):
            rows = torch.tensor([d == name for d in batch["denoiser"]], device=nll.device)
            self.log(f"train/loss_{name}", per_example[rows].sum() / tokens[rows].sum().clamp_min(1))
        return loss

    def sequence_logprob(self, batch: dict) -> torch.Tensor:
        nll, mask = target_nll(self.network, batch)
        return -(nll * mask).sum(1)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            nll, mask = target_nll(self.network, batch)
            self.val_nll.update((nll * mask).sum() / mask.sum(), weight=mask.sum())
            return
        k = batch["num_choices"]
        target = torch.zeros(len(batch["causal"]["input_ids"]) // k, dtype=torch.long, device=self.device)
        self.cloze_acc.update(self.sequence_logprob(batch["causal"]).view(-1, k), target)  # true word = choice 0
        self.cloze_infill_acc.update(self.sequence_logprob(batch["infill"]).view(-1, k), target)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_nll.compute()
        self.log_dict({"val/loss": loss, "val/ppl": math.exp(min(loss.item(), 50.0)),
                       "val/cloze_acc": self.cloze_acc.compute(), "val/cloze_infill_acc": self.cloze_infill_acc.compute()},
                      prog_bar=True, sync_dist=False)
        for metric in (self.val_nll, self.cloze_acc, self.cloze_infill_acc):
            metric.reset()
