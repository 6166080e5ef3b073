"""Causal language models for the zoo: a tiny one pre-trained here on offline text, or a hub model for GPU users.

- :func:`byte_tokenizer`: ``ByT5Tokenizer()`` (UTF-8 bytes, 384 ids, pad 0, eos 1); it needs no files, and bytes
  suit both prose and digits, so a 1M-parameter model already writes words and does small sums.
- :class:`CausalLM`: the model and its tokenizer in one ``nn.Module``. ``pretrained=None`` builds a GPT-2 or Llama
  config of a few layers; a hub name loads that model (downloads: GPU users only). ``checkpoint`` loads weights
  from a zoo run (``runs/<name>/checkpoints/last.ckpt``); ``lora_rank`` wraps it with peft LoRA.
- :class:`CausalLMTraining`: next-token cross-entropy on the tokens its data marks (all of a text window for
  pre-training, the response of a prompt/response pair for SFT); ``python -m zoo fit --config
  experiments/lm_pretrain_*.yaml`` writes the checkpoint the papers' CPU settings start from.
- :class:`TextDataModule` (random windows of a corpus) and :class:`SFTDataModule` (prompt/response pairs).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from zoo.core.data import StreamDataModule
from zoo.core.module import ZooModule

from .corpora import load_corpus, load_prompts

__all__ = ["byte_tokenizer", "CausalLM", "CausalLMTraining", "TextDataModule", "SFTDataModule", "pad_right"]


def byte_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


class CausalLM(nn.Module):
    """A causal LM plus its tokenizer (``self.model``, ``self.tokenizer``).

    Args:
        pretrained: hub name or local path (e.g. ``meta-llama/Meta-Llama-3-8B-Instruct``); None = a tiny config
            on the byte tokenizer, randomly initialised.
        arch, num_layers, hidden_size, num_heads, max_positions: the tiny config.
        checkpoint: a zoo checkpoint whose ``network.*`` weights are loaded (from an ``lm_pretrain_*`` run).
        lora_rank, lora_alpha, lora_dropout: wrap with peft LoRA on all linear layers when ``lora_rank`` > 0.
        dtype: weights' dtype for hub models (``bfloat16`` on GPU).
    """

    def __init__(self, pretrained: str | None = None, arch: Literal["gpt2", "llama"] = "gpt2", num_layers: int = 3,
                 hidden_size: int = 128, num_heads: int = 4, max_positions: int = 256,
                 checkpoint: str | None = None, lora_rank: int | None = None, lora_alpha: int = 64,
                 lora_dropout: float = 0.1, dtype: str = "float32"):
        super().__init__()
        if pretrained:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
            if self.tokenizer.pad_token is None:  # the papers' code pads with EOS
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        else:
            self.tokenizer = byte_tokenizer()
            self.model = _tiny_model(arch, len(self.tokenizer), num_layers, hidden_size, num_heads, max_positions,
                                     self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        if checkpoint:
            self.load_zoo_checkpoint(checkpoint)
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha,
                                                               lora_dropout=lora_dropout, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))

    def load_zoo_checkpoint(self, path: str) -> None:
        if not Path(path).exists():
            raise FileNotFoundError(
                f"language-model checkpoint not found: {Path(path).resolve()}\n  build it first, e.g. "
                f"`make train EXP=lm_pretrain_shakespeare` (python -m zoo fit --config "
                f"experiments/lm_pretrain_shakespeare.yaml), or point `checkpoint` at that run's last.ckpt")
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        weights = {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
        self.load_state_dict(weights)

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as an adapter-free model of the same config holds them (LoRA merged into the base)."""
        if not hasattr(self.model, "merge_and_unload"):
            return self.state_dict()
        merged = copy.deepcopy(self.model).merge_and_unload()
        return {f"model.{k}": v for k, v in merged.state_dict().items()}

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits; positions count real tokens only, so left- and right-padded batches give the same numbers."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def _tiny_model(arch, vocab, num_layers, hidden, heads, max_positions, pad_id, eos_id) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=hidden, n_layer=num_layers,
                            n_head=heads, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
        return GPT2LMHeadModel(config)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=max_positions, bos_token_id=eos_id, eos_token_id=eos_id,
                             pad_token_id=pad_id)
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown arch {arch!r}; use gpt2 or llama")


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def masked_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens where ``loss_mask`` is 1."""
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    mask = loss_mask[:, 1:].flatten().float()
    return (nll * mask).sum() / mask.sum().clamp_min(1)


class CausalLMTraining(ZooModule):
    """Pre-training or SFT of a :class:`CausalLM`: cross-entropy on the tokens marked by ``batch["loss_mask"]``.

    Logs ``val/loss`` and ``val/ppl`` (per target token) on the validation split.
    """

    expected_metrics = ("val/loss", "val/ppl")

    def __init__(self, network: CausalLM, optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 100, cosine_cycles: float = 0.5, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         cosine_cycles=cosine_cycles, ema_decay=None, **base)

    def _loss(self, batch: dict) -> torch.Tensor:
        logits = self.network(batch["input_ids"], batch["attention_mask"])
        return masked_token_loss(logits, batch["input_ids"], batch["loss_mask"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/ppl", math.exp(min(loss.item(), 50.0)), on_epoch=True, sync_dist=True)


class _Windows(Dataset):
    """Random fixed-length windows of a token stream; the sampler's per-draw seed picks the offset."""

    def __init__(self, ids: np.ndarray, block_size: int):
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return len(self.ids) - self.block_size

    def __getitem__(self, item) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        start = int(np.random.default_rng(seed).integers(len(self))) if seed is not None else index
        window = torch.from_numpy(self.ids[start: start + self.block_size].astype(np.int64))
        return {"idx": index, "input_ids": window, "attention_mask": torch.ones_like(window),
                "loss_mask": torch.ones_like(window)}


class TextDataModule(StreamDataModule):
    """Byte-level pre-training on a corpus: ``steps_per_epoch`` global batches of ``batch_size`` random
    ``block_size`` windows from the first 90% of the text; validation on ``val_windows`` evenly spaced windows of the
    last 10%."""

    def __init__(self, corpus: str = "tiny_shakespeare", block_size: int = 128, batch_size: int = 32,
                 eval_batch_size: int = 64, steps_per_epoch: int = 500, val_windows: int = 128, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        self.corpus, self.block_size, self.batch_size = corpus, block_size, batch_size
        self.eval_batch_size, self.steps_per_epoch, self.val_windows = eval_batch_size, steps_per_epoch, val_windows
        self.num_workers, self.seed = num_workers, seed
        self.dataset = corpus

    def setup(self, stage: str | None = None) -> None:
        ids = np.frombuffer(load_corpus(self.corpus).encode("utf-8"), dtype=np.uint8).astype(np.int64) + 3
        cut = int(len(ids) * 0.9)  # ByT5 ids are bytes + 3 (pad, eos, unk come first)
        self.train_set, self.val_ids = _Windows(ids[:cut], self.block_size), ids[cut:]

    def train_dataloader(self) -> DataLoader:
        return self.stream(self.train_set, self.batch_size, self.seed)

    def val_dataloader(self) -> DataLoader:
        windows = _Windows(self.val_ids, self.block_size)
        starts = np.linspace(0, len(windows) - 1, self.val_windows).astype(int).tolist()
        return self.eval_loader(Subset(windows, starts), self.eval_batch_size)


class _Pairs(Dataset):
    def __init__(self, items: list[dict], tokenizer):
        self.items, self.tokenizer = items, tokenizer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item) -> dict:
        index = item[0] if isinstance(item, tuple) else item
        prompt = self.tokenizer(self.items[index]["prompt"], add_special_tokens=False).input_ids
        response = self.tokenizer(self.items[index]["target"], add_special_tokens=False).input_ids
        return {"idx": index, "prompt": prompt, "response": response + [self.tokenizer.eos_token_id]}


def collate_sft(examples: list[dict], pad_id: int) -> dict:
    """Prompt + response (ending in EOS), right-padded; the loss covers the response tokens only."""
    input_ids, attention_mask = pad_right([e["prompt"] + e["response"] for e in examples], pad_id)
    loss_mask = torch.zeros_like(attention_mask)
    for i, e in enumerate(examples):
        loss_mask[i, len(e["prompt"]): len(e["prompt"]) + len(e["response"])] = 1
    return {"idx": torch.tensor([e["idx"] for e in examples]), "input_ids": input_ids,
            "attention_mask": attention_mask, "loss_mask": loss_mask}


class SFTDataModule(StreamDataModule):
    """Supervised fine-tuning on the labelled split of a prompt set (``sft``), validated on its ``test`` split.

    Args:
        task: a name accepted by :func:`zoo.lm.corpora.load_prompts` (``gsm8k_arithmetic``, ``gsm8k``).
        num_examples: how many labelled examples (None = all).
        batch_size: global batch per step (split across processes).
    """

    def __init__(self, task: str = "gsm8k_arithmetic", num_examples: int | None = None, batch_size: int = 32,
                 eval_batch_size: int = 64, steps_per_epoch: int = 200, val_examples: int = 256,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.task, self.num_examples, self.batch_size = task, num_examples, batch_size
        self.eval_batch_size, self.steps_per_epoch, self.val_examples = eval_batch_size, steps_per_epoch, val_examples
        self.num_workers, self.seed = num_workers, seed
        self.dataset = task

    def setup(self, stage: str | None = None) -> None:
        tokenizer = self.trainer.lightning_module.network.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.train_set = _Pairs(load_prompts(self.task, "sft")[: self.num_examples], tokenizer)
        self.val_set = _Pairs(load_prompts(self.task, "test")[: self.val_examples], tokenizer)

    def _collate(self, examples):
        return collate_sft(examples, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        return self.stream(self.train_set, self.batch_size, self.seed, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, self.eval_batch_size, collate_fn=self._collate)
