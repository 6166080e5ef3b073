"""COMET (``zoo/comet``) and its time-series family (``zoo/timeseries``): the four losses and the encoder against
numbers produced by running the official code on fixed inputs, the levels a data set really has, the trial-grouped
batches, the weight average, masks, label fractions and the metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from zoo.comet.losses import hierarchical, id_loss, observation_loss, sample_loss
from zoo.comet.module import COMET
from zoo.core.datasets import MissingDatasetError
from zoo.timeseries.data import GroupedSampler, TimeSeriesDataModule, label_subset
from zoo.timeseries.datasets import load_timeseries, window_trials
from zoo.timeseries.encoder import TS2VecEncoder, continuous_mask
from zoo.timeseries.evaluation import classification_metrics, linear_probe

# Golden numbers: DL4mHealth/COMET @ a769779ebf2394a47570b4cf9905306e65cd70b3, run here (torch 2.x, CPU) on the
# inputs of `_fixed` below. models/losses.py::contrastive_loss with
#   sample_contrastive_loss / observation_contrastive_loss, hierarchical=True, factor=0.25 (6 x 8 x 5 views);
#   patient_contrastive_loss (pid) / trial_contrastive_loss (tid), hierarchical=False, factor=0.25;
#   factor=1.0 on 3 x 7 x 4 views (odd length: pooling 7 -> 3 -> 1).
OFFICIAL_SAMPLE_HIER_F025 = 0.6841278672218323
OFFICIAL_OBSERVATION_HIER_F025 = 0.5650497674942017
OFFICIAL_PATIENT_F025 = 9.720870018005371  # the factor is NOT applied on the non-hierarchical path (see below)
OFFICIAL_TRIAL_F025 = 10.185446739196777
OFFICIAL_SAMPLE_HIER_T7 = 2.147773027420044
OFFICIAL_OBSERVATION_HIER_T7 = 2.7627077102661133
PID, TID = [0, 0, 1, 1, 2, 0], [0, 1, 2, 2, 3, 1]
# models/encoder.py::TSEncoder(input_dims=2, output_dims=8, hidden_dims=4, depth=3).eval(), parameter k (in
# named_parameters order) set to 0.3 sin(0.11 i + k), input _fixed(2, 10, 2, 0.7) (B x T x C), mask='all_true'
OFFICIAL_ENCODER_SUM = -13.934018418192863
OFFICIAL_ENCODER_LAST = [-0.6993855237960815, -0.1936902105808258, -0.052120938897132874, -0.17450031638145447,
                         0.4902539849281311, -0.0939989686012268, 0.526120662689209, 0.057143598794937134]


def _fixed(b, t, c, phase):
    return torch.sin(torch.arange(b * t * c, dtype=torch.float64).reshape(b, t, c) * 0.37 + phase).float()


# ------------------------------------------------------------------------------------ losses vs the official code
def test_sample_and_observation_losses_match_the_official_code():
    z1, z2 = _fixed(6, 8, 5, 0.0), _fixed(6, 8, 5, 1.3)
    assert 0.25 * hierarchical(sample_loss, z1, z2).item() == pytest.approx(OFFICIAL_SAMPLE_HIER_F025, rel=1e-5)
    assert 0.25 * hierarchical(observation_loss, z1, z2).item() == pytest.approx(OFFICIAL_OBSERVATION_HIER_F025,
                                                                                 rel=1e-5)
    z1, z2 = _fixed(3, 7, 4, 0.5), _fixed(3, 7, 4, 2.0)
    assert hierarchical(sample_loss, z1, z2).item() == pytest.approx(OFFICIAL_SAMPLE_HIER_T7, rel=1e-5)
    assert hierarchical(observation_loss, z1, z2).item() == pytest.approx(OFFICIAL_OBSERVATION_HIER_T7, rel=1e-5)


def test_trial_and_patient_losses_match_the_official_code_whose_factor_only_switches_them():
    """The official ``contrastive_loss`` multiplies the factor only on its hierarchical path: with factor 0.25 the
    patient/trial losses come back unscaled. Our weights multiply every level (the paper's L); weight 1 on these two
    levels reproduces the official objective."""
    z1, z2 = _fixed(6, 8, 5, 0.0), _fixed(6, 8, 5, 1.3)
    assert id_loss(z1, z2, torch.tensor(PID)).item() == pytest.approx(OFFICIAL_PATIENT_F025, rel=1e-5)
    assert id_loss(z1, z2, torch.tensor(TID)).item() == pytest.approx(OFFICIAL_TRIAL_F025, rel=1e-5)


def test_id_loss_by_its_formula_and_its_edge_cases():
    z1, z2 = _fixed(6, 8, 5, 0.0), _fixed(6, 8, 5, 1.3)
    ids = torch.tensor(PID)
    v1 = F.normalize(F.normalize(z1, dim=1).flatten(1), dim=1)
    v2 = F.normalize(F.normalize(z2, dim=1).flatten(1), dim=1)
    e = (v1 @ v2.T / 0.1).double().exp()
    upper = [-torch.log(e[i, j] / e[i].sum()) for i in range(6) for j in range(i + 1, 6) if ids[i] == ids[j]]
    lower = [-torch.log(e[i, j] / e[:, j].sum()) for i in range(6) for j in range(i) if ids[i] == ids[j]]
    expected = (torch.stack(upper).mean() + torch.stack(lower).mean()) / 2
    assert id_loss(z1, z2, ids).item() == pytest.approx(expected.item(), rel=1e-5)
    # the same window in the other view is not a positive: all-distinct ids give no term (the official returns 0)
    assert id_loss(z1, z2, torch.arange(6)).item() == 0.0
    # a wrong sign would make the loss fall when the positive pair's similarity falls
    z1.requires_grad_(True)
    id_loss(z1, z2, ids).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_sample_loss_is_zero_for_one_sample_and_observation_loss_for_one_timestamp():
    z = _fixed(1, 4, 3, 0.0)
    assert sample_loss(z, z).item() == 0.0
    z = _fixed(3, 1, 3, 0.0)
    assert observation_loss(z, z).item() == 0.0


# -------------------------------------------------------------------------------------------- the encoder
def test_encoder_matches_the_official_tsencoder_with_the_same_weights():
    encoder = TS2VecEncoder(2, 8, 4, 3).eval()
    with torch.no_grad():
        for k, (_, p) in enumerate(encoder.named_parameters()):
            p.copy_(0.3 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.11 + k).reshape(p.shape))
    out = encoder(_fixed(2, 10, 2, 0.7).transpose(1, 2), mask="all_true")
    assert out.shape == (2, 10, 8)
    assert out.double().sum().item() == pytest.approx(OFFICIAL_ENCODER_SUM, rel=1e-5)
    assert out[1, -1].tolist() == pytest.approx(OFFICIAL_ENCODER_LAST, abs=1e-5)


def test_continuous_mask_hides_spans_of_a_tenth_of_the_series():
    torch.manual_seed(0)
    mask = continuous_mask(64, 100)
    hidden = (~mask).sum(1)
    assert hidden.min() >= 10 and hidden.max() <= 50  # 5 spans of 10, possibly overlapping
    runs = torch.diff(mask.int(), dim=1)
    assert ((runs == -1).sum(1) <= 5).all()
    assert continuous_mask(4, 3).shape == (4, 3) and (~continuous_mask(4, 3)).sum(1).eq(1).all()  # 1 span of 1


def test_masked_timestamps_reach_the_encoder_as_zeros():
    encoder = TS2VecEncoder(1, 8, 4, 2).eval()
    x = torch.randn(2, 1, 12)
    torch.manual_seed(3)
    masked = encoder(x, "continuous")
    torch.manual_seed(3)
    mask = continuous_mask(2, 12)
    h = encoder.input_fc(x.transpose(1, 2)) * mask[..., None]
    assert torch.allclose(masked, encoder.feature_extractor(h.transpose(1, 2)).transpose(1, 2), atol=1e-6)


# ------------------------------------------------------------------------------------------ levels and data
def test_ucr_sets_have_no_patient_or_trial_levels():
    data = load_timeseries("ECG200")
    assert data.levels == ("sample", "observation")
    assert data.x_train.shape == (100, 1, 96) and data.x_test.shape == (100, 1, 96)
    dm = TimeSeriesDataModule("ECG200", batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "patient" not in batch and "trial" not in batch  # nothing invented
    with pytest.raises(ValueError, match="no trial ids"):
        TimeSeriesDataModule("ECG200", batch_size=8, group_by="trial").setup("fit")


def test_a_trial_level_without_trial_ids_stops_and_a_switched_off_level_runs_no_pass():
    model = COMET(TS2VecEncoder(1, 8, 4, 2), patient_weight=0)
    batch = {"x": torch.randn(4, 1, 16), "label": torch.zeros(4, dtype=torch.long), "idx": torch.arange(4)}
    with pytest.raises(ValueError, match="trial_weight: 0"):
        model.training_step(batch, 0)
    model = COMET(TS2VecEncoder(1, 8, 4, 2), patient_weight=0, trial_weight=0)
    calls = []
    model.network.register_forward_hook(lambda *args: calls.append(1))
    model.training_step(batch, 0)
    assert len(calls) == 4  # two views for each of the two remaining levels


def test_the_paper_sets_keep_their_real_path_and_fail_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_SHARED_DATA", str(tmp_path))
    with pytest.raises(MissingDatasetError, match="figshare.com/ndownloader/files/43196127"):
        load_timeseries("AD")


def test_windows_follow_the_official_split_of_ad_trials():
    trials = np.arange(2 * 1280 * 3, dtype=np.float32).reshape(2, 1280, 3)
    windows, trial_of = window_trials(trials, 256, 0.5)
    assert windows.shape == (18, 3, 256)  # 9 half-overlapping windows per trial
    assert trial_of.tolist() == [0] * 9 + [1] * 9
    assert np.array_equal(windows[1], trials[0, 128:384].T)


def test_grouped_sampler_keeps_groups_contiguous_and_reshuffles_each_epoch():
    groups = np.repeat(np.arange(5), 4)[np.random.default_rng(0).permutation(20)]
    sampler = GroupedSampler(groups, 20, seed=1)
    draws = sampler.global_draws(0)[0].numpy()
    order = groups[draws]
    assert sorted(draws.tolist()) == list(range(20))
    assert all(len(set(order[i:i + 4])) == 1 for i in range(0, 20, 4))  # each trial's windows together
    assert not np.array_equal(draws, sampler.global_draws(1)[0].numpy())
    shards = [list(GroupedSampler(groups, 20, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(i for shard in shards for i, _ in shard) == list(range(20))


def test_label_subset_is_stratified_with_every_class():
    labels = load_timeseries("ECG200").y_train
    one_percent = label_subset(labels, 0.01, seed=0)
    assert sorted(set(labels[one_percent])) == [0, 1] and len(one_percent) == 2
    ten_percent = label_subset(labels, 0.1, seed=0)
    assert len(ten_percent) == 10 and not np.array_equal(ten_percent, label_subset(labels, 0.1, seed=1))


# ---------------------------------------------------------------------------------- weight average, metrics
def test_the_weight_average_is_the_mean_of_all_iterates():
    model = COMET(TS2VecEncoder(1, 4, 4, 1), patient_weight=0, trial_weight=0)
    iterates = [torch.cat([p.detach().flatten().clone() for p in model.network.parameters()])]
    for step in range(3):
        with torch.no_grad():
            for p in model.network.parameters():
                p.add_(torch.randn_like(p))
        iterates.append(torch.cat([p.detach().flatten().clone() for p in model.network.parameters()]))
        model.ema.update(model.network, model.ema_decay_at(step))
    average = torch.cat([p.flatten() for p in model.ema.module.parameters()])
    assert torch.allclose(average, torch.stack(iterates).mean(0), atol=1e-6)


def test_metrics_against_sklearn_and_a_probe_on_separable_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probabilities = rng.dirichlet(np.ones(3), 60)
    scores = classification_metrics(probabilities, labels)
    assert scores["accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == labels))
    assert scores["auroc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"))
    features = np.eye(3)[labels] + 0.01 * rng.standard_normal((60, 3))
    assert linear_probe(features[:30], labels[:30], features[30:], labels[30:], 3)["accuracy"] == 1.0
