"""The shared LM blocks: masked sequence log-probs, seeded sampling with left padding, checkpoints, offline build."""
from __future__ import annotations

import socket

import pytest
import torch

from zoo.lm.corpora import load_prompts
from zoo.lm.generation import distinct_n, pack, sample, sequence_logprobs
from zoo.lm.tiny import CausalLM, masked_token_loss


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=64).eval()


def manual_response_logprob(lm: CausalLM, prompt: list[int], response: list[int]) -> float:
    """One unpadded sequence, summed token by token: the definition, with no masks involved."""
    ids = torch.tensor([prompt + response])
    logp = lm.model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logp[len(prompt) + j - 1, tok].item() for j, tok in enumerate(response))


def test_sequence_logprobs_ignore_prompt_and_padding(lm):
    prompts = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    responses = [[40, 41], [50, 51, 52, 53], [60]]
    batch = pack(prompts, responses, lm.pad_id)
    with torch.no_grad():
        total = sequence_logprobs(lm, **batch)
        mean = sequence_logprobs(lm, **batch, average=True)
        # different padding values and a different padding side must not change anything
        batch_other_pad = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 77))
        assert torch.allclose(sequence_logprobs(lm, **batch_other_pad), total, atol=1e-5)
        width = batch["input_ids"].shape[1]
        left = {k: torch.stack([torch.cat([row[batch["attention_mask"][i] == 0], row[batch["attention_mask"][i] == 1]])
                                for i, row in enumerate(v)]) for k, v in batch.items()}
        assert left["input_ids"].shape[1] == width
        assert torch.allclose(sequence_logprobs(lm, **left), total, atol=1e-4)
    expected = [manual_response_logprob(lm, p, r) for p, r in zip(prompts, responses)]
    assert torch.allclose(total, torch.tensor(expected), atol=1e-4)
    assert torch.allclose(mean, torch.tensor([e / len(r) for e, r in zip(expected, responses)]), atol=1e-4)


def test_masked_token_loss_counts_only_marked_tokens(lm):
    batch = pack([[10, 11, 12]], [[40, 41, 42]], lm.pad_id)
    with torch.no_grad():
        logits = lm(batch["input_ids"], batch["attention_mask"])
        loss = masked_token_loss(logits, batch["input_ids"], batch["response_mask"])
        expected = -manual_response_logprob(lm, [10, 11, 12], [40, 41, 42]) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_sampling_is_reproducible_and_leaves_global_rng_alone(lm):
    prompts = ["To be, or", "Now is the winter"]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = sample(lm, prompts, num_return_sequences=3, max_new_tokens=12, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = sample(lm, prompts, num_return_sequences=3, max_new_tokens=12, temperature=1.0, seed=7)
    other = sample(lm, prompts, num_return_sequences=3, max_new_tokens=12, temperature=1.0, seed=8)
    assert first.response_ids == again.response_ids
    assert first.response_ids != other.response_ids
    assert [len(g) for g in first.response_ids] == [3, 3]
    assert all(len(r) <= 12 and (lm.eos_id not in r[:-1]) for g in first.response_ids for r in g)


def test_left_padded_batch_generates_as_single_prompts(lm):
    prompts = ["a", "Now is the winter of", "12+7="]
    batched = sample(lm, prompts, max_new_tokens=10, do_sample=False)
    for i, prompt in enumerate(prompts):
        assert sample(lm, [prompt], max_new_tokens=10, do_sample=False).response_ids[0] == batched.response_ids[i]


def test_zoo_checkpoint_round_trip_and_missing_file(tmp_path, lm):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in lm.state_dict().items()}}, path)
    loaded = CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=64, checkpoint=str(path))
    for (name, a), b in zip(lm.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="make train EXP=lm_pretrain_shakespeare"):
        CausalLM(num_layers=1, hidden_size=32, num_heads=2, checkpoint=str(tmp_path / "absent.ckpt"))


def test_builds_offline_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    lm = CausalLM(arch="llama", num_layers=1, hidden_size=32, num_heads=2, max_positions=32)
    assert sample(lm, ["hi"], max_new_tokens=3, do_sample=False).responses


def test_distinct_n():
    assert distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)  # (a b), (b a), (b c) of 5 bigrams


def test_prompt_splits_are_disjoint():
    splits = {s: {p["prompt"] for p in load_prompts("two_digit_arithmetic", s)} for s in ("sft", "prompts", "test")}
    assert not (splits["sft"] & splits["prompts"]) and not (splits["test"] & (splits["sft"] | splits["prompts"]))
    for item in load_prompts("two_digit_arithmetic", "test"):
        a, rest = item["prompt"].rstrip("=").replace("-", "+-").split("+", 1)
        assert int(a) + int(rest) == int(item["target"])
    text = load_prompts("tiny_shakespeare", "test", prompt_chars=24, target_chars=48)
    assert all(len(t["prompt"]) == 24 for t in text) and len(text) > 500


def test_lora_weights_merge_into_a_plain_model():
    torch.manual_seed(0)
    lora = CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=32, lora_rank=4, lora_alpha=8,
                    lora_dropout=0.0).eval()
    with torch.no_grad():  # LoRA's B starts at zero: move it so that merging matters
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    plain = CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=32).eval()
    plain.load_state_dict(lora.plain_state_dict())
    ids = torch.tensor([[10, 20, 30, 40]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(lora(ids, mask), plain(ids, mask), atol=1e-4)
        with lora.model.disable_adapter():
            assert not torch.allclose(lora(ids, mask), plain(ids, mask), atol=1e-3)
