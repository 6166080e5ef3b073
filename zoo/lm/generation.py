"""Sampling and scoring with a :class:`~zoo.lm.tiny.CausalLM`: the loop shared by generate-score-train papers.

- :func:`sample`: N responses per prompt (``num_return_sequences``), prompts left-padded, reproducible under a
  seed without touching the global RNG; each response is cut after its first EOS (kept: the model learns to stop).
- :func:`pack` + :func:`sequence_logprobs`: prompt + response right-padded, and the summed (or mean) log-probability
  of the response tokens only: prompt and padding positions never count.
- :func:`distinct_n`: corpus-level distinct-n (unique word n-grams / all word n-grams), RAFT's diversity metric.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tiny import CausalLM, pad_right

__all__ = ["Samples", "sample", "pack", "sequence_logprobs", "distinct_n"]


@dataclass
class Samples:
    """``responses[i][k]``: the k-th response to prompt i, as text and as token ids (EOS included if produced)."""
    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    responses: list[list[str]]


@torch.no_grad()
def sample(lm: CausalLM, prompts: list[str], num_return_sequences: int = 1, max_new_tokens: int = 48,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True, seed: int = 0,
           batch_size: int = 64) -> Samples:
    tokenizer = lm.tokenizer
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    responses, response_ids = [], []
    was_training = lm.training
    lm.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompt_ids[start: start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[lm.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            device = next(lm.parameters()).device
            sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
            out = lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=do_sample,
                                    max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                    pad_token_id=lm.pad_id, eos_token_id=lm.eos_id, **sampling)
            generated = out[:, width:].tolist()
            for i in range(len(chunk)):
                group = [_cut_at_eos(g, lm.eos_id) for g in generated[i * num_return_sequences:
                                                                     (i + 1) * num_return_sequences]]
                response_ids.append(group)
                responses.append(tokenizer.batch_decode(group, skip_special_tokens=True))
    lm.train(was_training)
    return Samples(prompt_ids, response_ids, responses)


def _cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response with ``response_mask`` = 1 on the response tokens."""
    input_ids, attention_mask = pad_right([p + r for p, r in zip(prompt_ids, response_ids)], pad_id)
    response_mask = torch.zeros_like(attention_mask)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        response_mask[i, len(p): len(p) + len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def sequence_logprobs(lm: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean, ``average=True``) over response tokens of ``log p(token | everything before it)``."""
    logits = lm(input_ids, attention_mask)[:, :-1].float()
    token_logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = response_mask[:, 1:].to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


def distinct_n(texts: list[str], n: int) -> float:
    ngrams = [tuple(words[i: i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0
