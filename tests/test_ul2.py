"""UL2's mixture of denoisers (``zoo/ul2``): the span-corruption mask against the reference numpy port, the mask's
statistics against T5's definition, the sentinel layout, the S split, the mixing proportions, the mode tokens and
the loss on targets only.

Golden masks and layouts: huggingface/transformers ``examples/flax/language-modeling/run_t5_mlm_flax.py`` at commit
00661e38a9e1393472adae9ac71f777b74ccdcde, ``FlaxDataCollatorForT5MLM.random_spans_noise_mask`` (the numpy port of
google-research/text-to-text-transfer-transformer ``t5.data.preprocessors.random_spans_noise_mask``, whose TF
original needs TensorFlow, not installed here), ``create_sentinel_ids`` and ``filter_input_ids``; run unchanged
(``jax.ops.segment_sum`` through a numpy shim) on tokens 10..49, vocab_size 50 (so sentinels 50, 51, ...), EOS 1,
after ``np.random.seed(seed)``. The statistics tests compute T5's definitions independently (counts from the
docstring, the uniform-composition law of span lengths).
"""
from __future__ import annotations

from math import comb
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zoo.lm.tiny import CausalLM, byte_tokenizer, masked_token_loss
from zoo.ul2.data import UL2DataModule, collate
from zoo.ul2.denoisers import UL2_DENOISERS, Denoiser, denoise, random_prefix_split, random_spans_noise_mask, span_corrupt
from zoo.ul2.module import UL2, Seq2SeqLM, target_nll

# (noise_density, mean_noise_span_length, np.random.seed) -> reference mask, inputs, labels (both end with EOS 1)
GOLDEN = [
    (0.15, 3.0, 0, "0000000000110000000000000000000000001111",
     [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 50, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 51, 1],
     [50, 20, 21, 51, 46, 47, 48, 49, 1]),
    (0.15, 8.0, 1, "0000000000000000000000000000000000111111",
     [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 50, 1],
     [50, 44, 45, 46, 47, 48, 49, 1]),
    (0.5, 3.0, 2, "0000011000110110000001001001111101111111",
     [10, 11, 12, 13, 14, 50, 17, 18, 19, 51, 22, 52, 25, 26, 27, 28, 29, 30, 53, 32, 33, 54, 35, 36, 55, 42, 56, 1],
     [50, 15, 16, 51, 20, 21, 52, 23, 24, 53, 31, 54, 34, 55, 37, 38, 39, 40, 41, 56, 43, 44, 45, 46, 47, 48, 49, 1]),
    (0.5, 8.0, 3, "0000001111111111111111000000000000001111",
     [10, 11, 12, 13, 14, 15, 50, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 51, 1],
     [50, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 51, 46, 47, 48, 49, 1]),
    (0.15, 64.0, 4, "0000000000000000000000000000000000111111",
     [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 50, 1],
     [50, 44, 45, 46, 47, 48, 49, 1]),
    (0.5, 64.0, 5, "0000000000000000000011111111111111111111",
     [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 50, 1],
     [50, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 1]),
]


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    out = []
    for m in mask.tolist():
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + 1)
        else:
            out.append((m, 1))
    return out


# ------------------------------------------------------------------ parity with the reference port
@pytest.mark.parametrize("density, mean, seed, mask, inputs, labels", GOLDEN)
def test_mask_and_sentinel_layout_match_the_reference(density, mean, seed, mask, inputs, labels):
    ours = random_spans_noise_mask(40, density, mean, np.random.RandomState(seed))  # same legacy draws
    assert "".join("1" if m else "0" for m in ours) == mask
    got_inputs, got_targets = span_corrupt(np.arange(10, 50), ours, np.arange(50, 80))
    assert got_inputs.tolist() + [1] == inputs and got_targets.tolist() + [1] == labels


# ------------------------------------------------------------------ T5's definition of the mask
@pytest.mark.parametrize("length", [2, 7, 64, 130, 512])
@pytest.mark.parametrize("rate, mean_span", [(0.15, 3), (0.15, 8), (0.5, 3), (0.5, 8), (0.15, 64), (0.5, 64)])
def test_mask_counts_spans_and_alternation(length, rate, mean_span):
    rng = np.random.default_rng(length)
    noise = min(max(int(np.round(length * rate)), 1), length - 1)
    spans = max(int(np.round(noise / mean_span)), 1)
    for _ in range(20):
        mask = random_spans_noise_mask(length, rate, mean_span, rng)
        assert mask.shape == (length,) and mask.sum() == noise
        segments = runs(mask)
        assert [m for m, _ in segments] == [False, True] * spans  # non-noise first, alternating, ends on noise
        assert all(n >= 1 for _, n in segments)


def test_span_lengths_are_a_uniform_composition():
    """All masks equally likely: the first of s noise spans over n noise tokens has length k with probability
    C(n-k-1, s-2) / C(n-1, s-1) (stars and bars); 4000 draws, L=40, r=0.5, mu=5 (n=20, s=4)."""
    rng = np.random.default_rng(0)
    firsts = [runs(random_spans_noise_mask(40, 0.5, 5.0, rng))[1][1] for _ in range(4000)]
    n, s = 20, 4
    for k in range(1, n - s + 2):
        expected = comb(n - k - 1, s - 2) / comb(n - 1, s - 1)
        assert abs(np.mean(np.array(firsts) == k) - expected) < 0.025, k


def test_span_corruption_round_trips_to_the_window():
    rng = np.random.default_rng(1)
    sentinels = np.arange(1000, 1100)
    for d in UL2_DENOISERS:
        for _ in range(50):
            window = rng.integers(3, 259, size=int(rng.integers(8, 200)))
            inputs, targets = denoise(window, d, rng, sentinels)
            if d.kind == "prefix":
                rebuilt = np.concatenate([inputs, targets])
            else:  # put each span of the targets back where its sentinel sits in the inputs
                spans = {}
                for tok in targets.tolist():
                    if tok >= 1000:
                        key = tok
                        spans[key] = []
                    else:
                        spans[key].append(tok)
                assert all(spans.values()), "a sentinel with an empty span"
                assert sorted(spans) == sorted(t for t in inputs.tolist() if t >= 1000)
                rebuilt = np.array([x for t in inputs.tolist() for x in (spans[t] if t >= 1000 else [t])])
            assert np.array_equal(rebuilt, window), d.name


def test_s_denoiser_split_is_uniform_over_1_to_L_minus_1():
    rng = np.random.default_rng(2)
    splits = np.array([random_prefix_split(10, rng) for _ in range(9000)])
    assert splits.min() == 1 and splits.max() == 9
    assert np.allclose(np.bincount(splits, minlength=10)[1:] / 9000, 1 / 9, atol=0.015)
    window = np.arange(10)
    inputs, targets = denoise(window, Denoiser("prefix", mode="[S2S]"), np.random.default_rng(3), np.arange(90, 99))
    assert len(inputs) >= 1 and len(targets) >= 1 and np.array_equal(np.concatenate([inputs, targets]), window)


def test_paper_mixture():
    assert [(d.kind, d.mean_span, d.rate, d.mode) for d in UL2_DENOISERS if d.kind == "span"] == [
        ("span", 3, 0.15, "[NLU]"), ("span", 8, 0.15, "[NLU]"), ("span", 3, 0.5, "[NLG]"), ("span", 8, 0.5, "[NLG]"),
        ("span", 64, 0.15, "[NLG]"), ("span", 64, 0.5, "[NLG]")]
    assert [d.name for d in UL2_DENOISERS] == ["R_mu3_r0.15", "R_mu8_r0.15", "X_mu3_r0.5", "X_mu8_r0.5",
                                               "X_mu64_r0.15", "X_mu64_r0.5", "S"]
    assert UL2_DENOISERS[-1].kind == "prefix" and UL2_DENOISERS[-1].mode == "[S2S]"


# ------------------------------------------------------------------ the data module
def data_module(network=None, **kwargs) -> UL2DataModule:
    network = network or SimpleNamespace(tokenizer=byte_tokenizer())
    dm = UL2DataModule(block_size=64, batch_size=4, steps_per_epoch=2, val_windows=8, cloze_questions=8, **kwargs)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(network=network), global_step=0,
                                 accumulate_grad_batches=1, global_rank=0, world_size=1)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dm():
    return data_module()


@pytest.mark.parametrize("rates", [None, [4, 2, 1, 1, 1, 1, 2]])
def test_mixing_proportions(rates):
    dm = data_module(rates=rates)
    draws = np.array([dm.train_set[(0, seed)]["denoiser"] for seed in range(3000)])
    expected = np.full(7, 1 / 7) if rates is None else np.array(rates) / sum(rates)
    observed = np.bincount(draws, minlength=7) / len(draws)
    assert np.all(np.abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / len(draws)))


def test_examples_carry_their_mode_token_and_are_reproducible(dm):
    tok = dm.tokenizer
    for seed in range(40):
        ex = dm.train_set[(3, seed)]
        assert tok.decode(ex["mode"]) == dm.denoisers[ex["denoiser"]].mode
        assert ex["targets"][-1] == tok.eos_token_id
        again = dm.train_set[(3, seed)]
        assert again["inputs"] == ex["inputs"] and again["targets"] == ex["targets"]
    cloze = next(iter(dm.val_dataloader()[1]))
    assert tok.decode(cloze["infill"]["input_ids"][0]).startswith("[NLU]")
    assert tok.decode(cloze["causal"]["input_ids"][0]).startswith("[S2S]")


def test_loss_mask_covers_the_targets_only(dm):
    examples = [dm.train_set[(i, 100 + i)] for i in range(6)]
    batch = collate(examples, dm.pad_id, encoder_decoder=False)
    for row, e in zip(range(6), examples):
        marked = batch["input_ids"][row][batch["loss_mask"][row].bool()].tolist()
        assert marked == e["targets"]
    # the loss reads the logits only where the next token is a target: equal to a hand loop
    logits = torch.randn(*batch["input_ids"].shape, 384)
    nll, mask = target_nll(lambda ids, attn: logits, batch)
    hand, count = 0.0, 0
    for b in range(6):
        for t in range(batch["input_ids"].shape[1] - 1):
            if batch["loss_mask"][b, t + 1]:
                hand -= torch.log_softmax(logits[b, t], -1)[batch["input_ids"][b, t + 1]].item()
                count += 1
    assert torch.isclose((nll * mask).sum() / mask.sum(), torch.tensor(hand / count), atol=1e-5)


def test_encoder_decoder_layout_and_t5_forward():
    net = Seq2SeqLM(num_layers=1, hidden_size=32, num_heads=2)
    dm = data_module(net)
    examples = [dm.train_set[(i, 7 + i)] for i in range(4)]
    batch = collate(examples, dm.pad_id, encoder_decoder=True)
    eos = dm.tokenizer.eos_token_id
    for row, e in enumerate(examples):
        labels = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labels == e["targets"] and labels[-1] == eos
        encoder = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert encoder == e["mode"] + e["inputs"] and encoder[-1] == eos
    nll, mask = target_nll(net, batch)
    assert torch.isfinite(nll).all() and mask.sum() == sum(len(e["targets"]) for e in examples)


def test_causal_baseline_reads_held_out_text_as_the_pretraining_loss():
    """The baseline's val/loss is lm_pretrain's: next-token loss over the window's tokens 1..L-1."""
    net = CausalLM(num_layers=1, hidden_size=32, num_heads=2).eval()  # no dropout: two forwards must agree
    dm = data_module(net, denoisers=[{"kind": "causal", "mode": ""}], eval_mode="", infill_mode="")
    batch = next(iter(dm.val_dataloader()[0]))
    windows = torch.tensor(np.stack([dm.val_ids[s: s + 64] for s in
                                     np.linspace(0, len(dm.val_ids) - 65, 8).astype(int)]))
    ones = torch.ones_like(windows)
    with torch.no_grad():
        expected = masked_token_loss(net(windows, ones), windows, ones)
        nll, mask = target_nll(net, batch)
    assert torch.isclose((nll * mask).sum() / mask.sum(), expected, atol=1e-6)
    ex = dm.train_set[(0, 5)]
    assert ex["mode"] == [] and ex["inputs"] == [] and len(ex["targets"]) == 64  # whole window, no EOS


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="kind"):
        Denoiser("mask")
    with pytest.raises(ValueError, match="rate"):
        Denoiser("span", 3.0, 1.5)
    with pytest.raises(ValueError, match="rates"):
        UL2DataModule(rates=[1, 2])


def test_module_trains_one_step_on_the_mixture(dm):
    torch.manual_seed(0)
    net = CausalLM(num_layers=1, hidden_size=32, num_heads=2)
    assert UL2(net).network is net
    batch = next(iter(dm.train_dataloader()))
    assert all(name in {d.name for d in UL2_DENOISERS} for name in batch["denoiser"])
    nll, mask = target_nll(net, batch)
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters() if p.requires_grad)
