"""CREAM: parity of the consistency rate, pairs, masked log-probs and consistency-weighted DPO with the official code,
and the mechanics of one self-rewarding round.

Constants were produced by running Raibows/CREAM @ de1d04bdaf77d9c67844243437ba92433aa6c9d6 in /tmp/cream_ref:
- ``cal_consistency.py --method kendall`` on two reward files (CURRENT as file1 = M_t's rewards, PREVIOUS as file2),
  which wrote the pairs and per-prompt consistency below (prompt ``c`` has equal rewards and is skipped);
- ``sft_dpo_trainer.dpo_forward_policy_logp`` on FixedLM below with labels = input ids, prompt and padding set to
  pad id 0 (sum and ``return_mean=True``);
- ``CustomTrainer.training_step`` (called with a stub trainer) for ``consistency_dyn`` with consistency [0.8, 0.35]
  and for ``original``, reference log-probs REFERENCE, beta 0.1: the loss and the logged mean rewards.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from scipy.stats import kendalltau, rankdata

from zoo.cream.module import CREAM, preference_pairs
from zoo.lm.generation import pack, sequence_logprobs
from zoo.lm.preference import consistency_rate, dpo_loss, kendall_tau, ordinal_ranks
from zoo.lm.rounds import RoundDataModule
from zoo.lm.tiny import CausalLM

CURRENT = {"a": [0.3, -1.2, 2.0, 0.5, 0.5], "b": [1.0, 2.0, 3.0, 4.0, 5.0], "c": [0.1] * 5,
           "d": [-3.0, 4.0, 1.5, 0.0, 2.2]}
PREVIOUS = {"a": [0.1, -0.5, 0.9, 0.9, 0.2], "b": [5.0, 4.0, 3.0, 2.0, 1.0], "c": [0.4, 0.3, 0.2, 0.1, 0.0],
            "d": [-1.0, 1.0, 2.0, -2.0, 3.0]}
OFFICIAL_PAIRS = {"a": (2, 1, 0.8), "b": (4, 0, 5.551115123125783e-17), "d": (1, 0, 0.7)}  # chosen, rejected, C

V = 11
TABLE = torch.sin(torch.arange(V)[:, None] * 0.7 + torch.arange(V)[None, :] * 1.3) * 2.0
POSITION = torch.cos(torch.arange(16)[:, None] * 0.9 + torch.arange(V)[None, :] * 0.4)
INPUT_IDS = torch.tensor([[5, 3, 7, 2, 9, 0, 0], [4, 4, 1, 6, 0, 0, 0], [5, 3, 7, 8, 8, 1, 0],
                          [4, 4, 1, 10, 3, 2, 7]])
PROMPT_LENGTH = 3
OFFICIAL_LOGP_SUM = [-3.4257912635803223, -2.257171630859375, -7.684106349945068, -17.98939323425293]
OFFICIAL_LOGP_MEAN = [-1.7128956317901611, -2.257171630859375, -2.561368703842163, -4.497348308563232]
REFERENCE = {"chosen": [-9.5, -7.25], "rejected": [-12.0, -6.0]}
OFFICIAL_DPO = {"dyn": 0.9580813050270081, "original": 0.388575941324234}
OFFICIAL_REWARDS = {"chosen": 0.5533518493175507, "rejected": -0.3836749792098999}


class FixedLM(torch.nn.Module):
    """Logits from fixed tables of the token id and the position (the same as in the reference script)."""

    def forward(self, input_ids, attention_mask):
        return TABLE[input_ids] + POSITION[: input_ids.shape[1]]


def fixed_batch():
    attention = (INPUT_IDS != 0).long()
    response = attention.clone()
    response[:, :PROMPT_LENGTH] = 0
    return INPUT_IDS, attention, response


def test_consistency_rate_and_pairs_match_official():
    keys = list(CURRENT)
    current = torch.tensor([CURRENT[k] for k in keys])
    previous = torch.tensor([PREVIOUS[k] for k in keys])
    rates = consistency_rate(current, previous)
    chosen, rejected, keep = preference_pairs(current)
    for i, key in enumerate(keys):
        if key in OFFICIAL_PAIRS:
            c, r, rate = OFFICIAL_PAIRS[key]
            assert (chosen[i].item(), rejected[i].item()) == (c, r)
            assert rates[i].item() == pytest.approx(rate, abs=1e-9)
        else:
            assert not keep[i]  # equal rewards: argmax == argmin, the official script skips the prompt
            tau, _ = kendalltau(rankdata(CURRENT[key], method="ordinal"), rankdata(PREVIOUS[key], method="ordinal"))
            assert rates[i].item() == pytest.approx((tau + 1) / 2)


def test_ordinal_ranks_and_kendall_tau_match_scipy():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 6), generator=g).float()  # many ties: broken by position
    other = torch.randn(50, 6, generator=g)
    ranks, ranks_other = ordinal_ranks(scores), ordinal_ranks(other)
    for row in range(50):
        assert ranks[row].tolist() == rankdata(scores[row].numpy(), method="ordinal").tolist()
        tau, _ = kendalltau(ranks[row].numpy(), ranks_other[row].numpy())
        assert kendall_tau(ranks[row], ranks_other[row]).item() == pytest.approx(tau, abs=1e-12)


def test_masked_logprobs_match_official():
    ids, attention, response = fixed_batch()
    with torch.no_grad():
        assert sequence_logprobs(FixedLM(), ids, attention, response).tolist() == pytest.approx(OFFICIAL_LOGP_SUM,
                                                                                                 abs=1e-5)
        assert sequence_logprobs(FixedLM(), ids, attention, response, average=True).tolist() == pytest.approx(
            OFFICIAL_LOGP_MEAN, abs=1e-5)


@pytest.mark.parametrize("method", ["dyn", "original"])
def test_consistency_weighted_dpo_matches_official(method):
    ids, attention, response = fixed_batch()
    chosen, rejected = sequence_logprobs(FixedLM(), ids, attention, response).chunk(2)
    label = torch.tensor([0.8, 0.35]) if method == "dyn" else 1.0
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, torch.tensor(REFERENCE["chosen"]),
                                                        torch.tensor(REFERENCE["rejected"]), 0.1, label)
    assert losses.mean().item() == pytest.approx(OFFICIAL_DPO[method], abs=1e-6)
    assert chosen_rewards.mean().item() == pytest.approx(OFFICIAL_REWARDS["chosen"], abs=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(OFFICIAL_REWARDS["rejected"], abs=1e-6)
    weighted, _, _ = dpo_loss(chosen, rejected, torch.tensor(REFERENCE["chosen"]),
                              torch.tensor(REFERENCE["rejected"]), 0.1, label, weights=torch.tensor([2.0, 0.0]))
    assert torch.allclose(weighted, losses * torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("label,direction", [(1.0, 1), (0.0, -1)])
def test_dpo_step_moves_the_margin_towards_the_label(label, direction):
    torch.manual_seed(0)
    lm = CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=32)
    batch = pack([[10, 11], [10, 11]], [[40, 41, 1], [50, 51, 1]], lm.pad_id)
    with torch.no_grad():
        reference = sequence_logprobs(lm, **batch)
    optimizer = torch.optim.SGD(lm.parameters(), lr=0.5)
    chosen, rejected = sequence_logprobs(lm, **batch).chunk(2)
    dpo_loss(chosen, rejected, reference[:1], reference[1:], beta=0.1, label=label)[0].mean().backward()
    optimizer.step()
    with torch.no_grad():
        chosen_after, rejected_after = sequence_logprobs(lm, **batch).chunk(2)
    margin = (chosen_after - reference[0]) - (rejected_after - reference[1])
    assert direction * margin.item() > 0


def _tiny_lm():
    return CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=64)


@pytest.mark.parametrize("consistency", ["avg", "dyn", "none"])
def test_round_builds_consistency_labelled_pairs_on_fresh_prompts(consistency):
    torch.manual_seed(0)
    initial = _tiny_lm()  # M0
    module = CREAM(_tiny_lm(), initial, consistency=consistency, num_samples=4, temperature=1.5, top_p=1.0,
                   max_new_tokens=5, eval_max_new_tokens=5, lr=1e-3)
    data = RoundDataModule(prompts="two_digit_arithmetic", prompts_per_round=12, eval_prompts=4, batch_size=4,
                           eval_batch_size=4, steps_per_epoch=2, answer_position="first")
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    built = []
    original_build = module.build_round

    def recording_build(prompts, round_index):
        start = {k: v.clone() for k, v in module.network.state_dict().items()}
        examples = original_build(prompts, round_index)
        built.append((prompts, examples, start))
        return examples

    module.build_round = recording_build
    trainer.fit(module, datamodule=data)

    assert len(built) == 2 and {p["prompt"] for p in built[0][0]}.isdisjoint({p["prompt"] for p in built[1][0]})
    prompts, examples, start = built[1]
    assert examples, "no pairs were built"
    labels = torch.tensor([e["consistency"] for e in examples])
    if consistency == "none":
        assert torch.all(labels == 1)
    elif consistency == "avg":
        assert torch.allclose(labels, torch.full_like(labels, module.round_stats["round/consistency"]))
    else:
        assert labels.min() >= 0 and labels.max() <= 1 and module.round_stats["round/consistency"] >= 0
    # the previous model is M_t of the round just built; reference log-probs are the policy's at round start
    for name, value in module.previous.state_dict().items():
        assert torch.equal(value, start[name]), name
    snapshot = _tiny_lm()
    snapshot.load_state_dict(start)
    example = examples[0]
    batch = pack([example["prompt"]], [example["chosen"]], snapshot.pad_id)
    with torch.no_grad():
        reference_chosen = sequence_logprobs(snapshot.eval(), **batch).item()
    assert reference_chosen == pytest.approx(example["reference_chosen"], abs=1e-4)
    assert "val/acc" in trainer.callback_metrics
    # frozen models score without dropout even when left in training mode
    module.reference.train()
    ids = [example["prompt"]] * 2
    responses = [example["chosen"]] * 2
    first = module._logprobs(module.reference, ids, responses, average=False)
    assert torch.equal(first, module._logprobs(module.reference, ids, responses, average=False))


def test_plain_srlm_is_cream_with_unit_labels():
    g = torch.Generator().manual_seed(1)
    chosen, rejected, ref_c, ref_r = torch.randn(4, 5, generator=g)
    plain, _, _ = dpo_loss(chosen, rejected, ref_c, ref_r, 0.1)
    cream_full_confidence, _, _ = dpo_loss(chosen, rejected, ref_c, ref_r, 0.1, torch.ones(5))
    assert torch.allclose(plain, cream_full_confidence)
    half, _, _ = dpo_loss(chosen, rejected, ref_c, ref_r, 0.1, torch.full((5,), 0.5))
    margin = 0.1 * ((chosen - ref_c) - (rejected - ref_r))
    expected = 0.5 * (torch.nn.functional.softplus(-margin) + torch.nn.functional.softplus(margin))
    assert torch.allclose(half, expected, atol=1e-6)

