"""RAFT: the selection rules against LMFlow's expressions, and the mechanics of rounds (on-policy sampling, best-of-K
kept, SFT on the kept responses only, fresh prompts each round).

Selection constants: /tmp/raft_ref/selection.py ran LMFlow's own selection expressions (OptimalScale/LMFlow
@ 0128b9c9f5717d9837672f5affa2aa9fe205dd3f, ``src/lmflow/pipeline/raft_aligner.py``: ``np.argmax(rewards)`` per
prompt in ``_get_batch_dataset_local``; ``np.argsort(reward_eva)[::-1][:int(data_size * alpha)]`` in
``_get_batch_dataset_top``) on the rewards below. LMFlow's selection sits inside its sampling loop and cannot be
called alone; the expressions were run verbatim in that scratch script.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch

from zoo.lm.rounds import RoundDataModule
from zoo.lm.tiny import CausalLM
from zoo.raft.module import RAFT, select_best
from zoo.raft.rewards import Reward, VaderReward

LOCAL_REWARDS = [[0.1, 0.7, 0.7, -0.2], [0.5, 0.4, 0.3, 0.2], [-1.0, -0.5, -0.9, 0.0]]
LMFLOW_LOCAL = [1, 4, 11]  # flat indices; ties -> first
TOP_REWARDS = [0.3, -0.1, 0.9, 0.45, 0.05, 0.8, -0.6, 0.2, 0.65, 0.0]
LMFLOW_TOP = {0.2: [2, 5], 0.25: [2, 5], 0.5: [2, 5, 8, 3, 0]}


def test_local_selection_matches_lmflow():
    assert select_best(torch.tensor(LOCAL_REWARDS), "local", 0.25).tolist() == LMFLOW_LOCAL


@pytest.mark.parametrize("alpha", sorted(LMFLOW_TOP))
def test_top_selection_matches_lmflow(alpha):
    assert select_best(torch.tensor(TOP_REWARDS), "top", alpha).tolist() == LMFLOW_TOP[alpha]


def test_vader_reward_prefers_positive_text():
    scores = VaderReward()(["I love thee, sweet and good friend", "the table", "death, grief and woe"])
    assert scores[0] > 0.5 and scores[1] == 0 and scores[2] < -0.5


class LetterCount(Reward):
    """A frozen toy reward: how many times the letter 'e' occurs; remembers every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.tensor([float(t.count("e")) for t in texts])


def test_rounds_keep_the_best_sample_and_train_on_it():
    torch.manual_seed(0)
    lm = CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=96)
    reward = LetterCount()
    module = RAFT(lm, reward, selection="local", top_reward_percentage=0.25, output_min_length=6,
                  output_max_length=10, temperature=1.0, eval_max_new_tokens=8, lr=1e-3)
    data = RoundDataModule(prompts="tiny_shakespeare", prompts_per_round=6, eval_prompts=4, batch_size=3,
                           eval_batch_size=4, steps_per_epoch=2)
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    rounds = []
    original_build = module.build_round

    def recording_build(prompts, round_index):
        weights = [p.detach().clone() for p in module.network.parameters()]
        examples = original_build(prompts, round_index)
        rounds.append((prompts, examples, weights, reward.calls[-1]))
        return examples

    module.build_round = recording_build
    trainer.fit(module, datamodule=data)

    assert len(rounds) == 2
    assert {p["prompt"] for p in rounds[0][0]}.isdisjoint({p["prompt"] for p in rounds[1][0]})
    # on-policy: the second round samples from weights that the first round's SFT changed
    assert any(not torch.equal(a, b) for a, b in zip(rounds[0][2], rounds[1][2]))
    prompts, examples, _, scored = rounds[1]
    assert len(examples) == len(prompts) and len(scored) == 4 * len(prompts)  # local: K = 4, one kept per prompt
    for i, (prompt, example) in enumerate(zip(prompts, examples)):
        group = scored[4 * i: 4 * i + 4]  # the reward saw prompt + response, with no separator (LMFlow)
        assert all(text.startswith(prompt["prompt"]) for text in group)
        assert example["reward"] == max(text.count("e") for text in group)
        assert prompt["prompt"] + example["text"] == group[[t.count("e") for t in group].index(example["reward"])]
        assert 6 <= len(example["response"]) <= 9
    assert {"val/reward", "val/distinct_2", "val/ppl"} <= set(trainer.callback_metrics)


def test_prompt_tokens_are_not_trained_when_masked():
    torch.manual_seed(0)
    lm = CausalLM(num_layers=1, hidden_size=32, num_heads=2, max_positions=64).eval()  # no dropout
    module = RAFT(lm, LetterCount())
    batch = module.collate([{"prompt": [10, 11, 12, 13], "response": [40, 41, 1]}])
    logits = lm(batch["input_ids"], batch["attention_mask"])
    logp = logits[0, :-1].log_softmax(-1).gather(1, batch["input_ids"][0, 1:, None]).squeeze(1)
    module.log = lambda *args, **kwargs: None
    assert module.training_step(batch, 1).item() == pytest.approx(-logp[3:6].mean().item(), abs=1e-5)
    module.mask_prompt = False
    assert module.training_step(batch, 1).item() == pytest.approx(-logp.mean().item(), abs=1e-5)
