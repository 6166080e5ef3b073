"""T-JEPA: masks, tokenizer/encoder/predictor/loss against the official code (github.com/jose-melo/t-jepa, commit
98dda99, run here on CPU with torch + tabulate), and what could go wrong in the step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.tabular.data import TabularDataModule, load_table
from zoo.tjepa.module import (TJEPA, TabularEncoder, TokenPredictor, gather_tokens, sample_mask_sizes,
                              sample_row_masks)

JANNIS_SHARES = ((0.13628349247854785, 0.36819012681604135), (0.1556321308543076, 0.6222278244105446))

# src/mask.py::MaskCollator(False, *JANNIS_SHARES, num_preds=4, num_encs=1, num_features=30, []) called once on a
# batch of 3 rows after np.random.seed(0) (its size generator seeded by its step counter, 0): sizes (7, 16).
GOLDEN_CONTEXT = [[2, 28, 13, 10, 26, 24, 27], [5, 19, 13, 16, 12, 11, 7], [25, 16, 22, 6, 21, 11, 26]]
# ... and its 4 targets per row, all equal (each is a view of the array the next draw shuffles again)
GOLDEN_TARGET = [[17, 22, 14, 8, 7, 3, 19, 0, 12, 9, 15, 25, 21, 29, 18, 1],
                 [24, 20, 27, 3, 6, 14, 29, 10, 1, 17, 15, 8, 23, 22, 28, 4],
                 [13, 15, 18, 0, 3, 20, 9, 1, 7, 29, 24, 27, 17, 19, 23, 14]]

# src/encoder.py::Encoder(D=5, n_cls_tokens=2, hidden 8, 2 layers, 2 heads, ff 16, dropout 0) and
# src/predictors.py::Predictors("transformer", hidden 8, pred_embed_dim 8, 1 layer, 2 heads, ff 12), eval mode,
# parameter k (named_parameters order, skipping the unused template layer `transformer_layers`, the predictor's unused
# `layer_norm` and its fixed `predictor_pos_embed`) = 0.2 sin(0.7 i + 1.3 k); inputs X, masks below;
# loss = train.py's MSELoss(predictors(z, ctx, trg), apply_masks_from_idx(target_encoder(x), trg)).
X = [[0.5, -1.0, 2.0, 0.0, 1.5], [-0.3, 0.8, -1.2, 0.4, 0.1], [1.1, 0.2, -0.7, -2.0, 0.9]]
CTX = [[0, 3], [2, 4], [1, 0]]
TRG = [[[1, 2], [0, 3], [4, 2]], [[4, 1], [1, 0], [3, 2]]]
GOLDEN_TOKENS_ROW1 = [[0.0, 1.1288435459136963, 0.19708995521068573], [0.7152175903320312, 0.5436651110649109,
                      0.4423809051513672], [1.160759687423706, -0.19719913601875305, 0.6745857000350952],
                      [0.11479722708463669, -0.9525087475776672, 0.896310031414032],
                      [-0.6746535301208496, -0.3203839063644409, 1.381213903427124],
                      [-1.0735145807266235, 0.24072086811065674, 1.048850178718567],
                      [-0.46115726232528687, 0.83148193359375, 0.9320374727249146]]  # tokens[1, :, :3]
GOLDEN_FULL_2_3 = [-0.16785307228565216, -0.2799743711948395, -0.21455271542072296, -0.20985613763332367,
                   -0.31798815727233887, -0.2949255406856537, -0.03362366184592247, 0.1863517314195633]
GOLDEN_PRED_4_1 = [0.04959625005722046, 0.2411195933818817, 0.3224157392978668, 0.2550169825553894,
                   0.06906852126121521, -0.15015211701393127, -0.3013651371002197, -0.3141036927700043]
GOLDEN_LOSS = 0.16546617448329926


def _fill(module: torch.nn.Module) -> None:
    for k, (_, p) in enumerate(module.named_parameters()):
        with torch.no_grad():
            p.copy_((0.2 * torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + 1.3 * k)).reshape(p.shape))


def test_mask_sizes_and_rows_match_official_collator():
    assert sample_mask_sizes(30, *JANNIS_SHARES, torch.Generator().manual_seed(0)) == (7, 16)
    rng = np.random.RandomState(0)  # one stream for the batch, as the collator's global np.random
    for row in range(3):
        context, targets = sample_row_masks(30, 7, 16, 4, rng)
        assert context.tolist() == GOLDEN_CONTEXT[row]
        assert targets[-1].tolist() == GOLDEN_TARGET[row]  # the official keeps only the last draw (aliasing)
        assert len({tuple(t) for t in targets.tolist()}) == 4  # ours keeps the paper's 4 distinct targets


def test_masks_never_leak_targets_into_the_context():
    rng = np.random.RandomState(1)
    for step in range(50):
        c, t = sample_mask_sizes(30, *JANNIS_SHARES, torch.Generator().manual_seed(step))
        assert 4 <= c <= 11 and 5 <= t <= 19 and c + t <= 30  # round(30 * share) bounds
        context, targets = sample_row_masks(30, c, t, 4, rng)
        assert len(set(context)) == c and all(len(set(row)) == t for row in targets)
        assert not set(context) & set(targets.ravel())


def test_encoder_predictor_and_loss_match_official_forward():
    encoder, predictor = TabularEncoder(5, 2, 8, 2, 2, 16, 0.0), TokenPredictor(5, 8, 8, 1, 2, 12, 0.0)
    _fill(encoder), _fill(predictor)
    encoder.eval(), predictor.eval()
    x, ctx, trg = torch.tensor(X), torch.tensor(CTX), torch.tensor(TRG)
    with torch.no_grad():
        torch.testing.assert_close(encoder.tokens(x)[1, :, :3], torch.tensor(GOLDEN_TOKENS_ROW1))
        full = encoder(x)
        torch.testing.assert_close(full[2, 3], torch.tensor(GOLDEN_FULL_2_3), atol=1e-5, rtol=1e-5)
        predictions = predictor(encoder(x, ctx), ctx, trg)
        torch.testing.assert_close(predictions[4, 1], torch.tensor(GOLDEN_PRED_4_1), atol=1e-5, rtol=1e-5)
        targets = torch.cat([gather_tokens(full, t) for t in trg])
        assert F.mse_loss(predictions, targets).item() == pytest.approx(GOLDEN_LOSS, rel=1e-5)


def _tiny(**kw) -> TJEPA:
    args = dict(num_features=30, dim=8, num_layers=1, num_heads=2, dim_feedforward=16, pred_dim=8,
                pred_num_layers=1, pred_num_heads=2, pred_dim_feedforward=16, dropout=0.0, pred_dropout=0.0)
    return TJEPA(**(args | kw))


def test_only_the_context_path_gets_gradients_and_context_is_only_the_context():
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randn(6, 30)
    context_idx, target_idx = model.sample_masks(torch.arange(6), step=0)
    model.jepa_loss(x, context_idx, target_idx).backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.network.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    # the context encoder's output depends on the context features only
    out = model.network(x, context_idx)
    hidden = torch.ones(30, dtype=torch.bool)
    for row in range(6):
        visible = context_idx[row] - model.network.num_reg_tokens  # token index -> feature index
        hidden[:] = True
        hidden[visible[visible >= 0]] = False
        changed = x.clone()
        changed[row, hidden] += 5.0
        torch.testing.assert_close(model.network(changed, context_idx)[row], out[row])


def test_target_momentum_schedule_and_update():
    model = _tiny()
    model.total_steps = 100
    assert model.target_momentum_at(0) == 0.996 and model.target_momentum_at(100) == 1.0
    assert model.target_momentum_at(50) == pytest.approx(0.998)
    before = [p.clone() for p in model.target_encoder.parameters()]
    with torch.no_grad():
        for p in model.network.parameters():
            p.add_(1.0)
    model.target_encoder.update(model.network, 0.996)
    for b, t, s in zip(before, model.target_encoder.parameters(), model.network.parameters()):
        torch.testing.assert_close(t, 0.996 * b + 0.004 * s)


def test_masks_depend_on_row_seed_not_on_batch_composition():
    model = _tiny()
    c_all, t_all = model.sample_masks(torch.tensor([11, 22, 33, 44]), step=7)
    c_half, t_half = model.sample_masks(torch.tensor([33, 44]), step=7)  # the other rank's share
    assert torch.equal(c_all[2:], c_half) and torch.equal(t_all[:, 2:], t_half)


def test_tables_split_and_standardise_on_train_rows():
    table = load_table("wine", split_seed=3)
    assert table.num_features == 13 and table.num_classes == 3
    assert len(table.y_train) + len(table.y_val) + len(table.y_test) == 178
    np.testing.assert_allclose(table.x_train.mean(0), 0, atol=1e-5)
    assert abs(table.x_test.mean()) > 1e-4  # not re-standardised on its own rows
    counts = [np.bincount(y, minlength=3) / len(y) for y in (table.y_train, table.y_test)]
    np.testing.assert_allclose(counts[0], counts[1], atol=0.1)  # stratified
    regression = load_table("diabetes")
    assert regression.task == "regression" and regression.y_train.dtype == np.float32
    data = TabularDataModule("breast_cancer", batch_size=8)
    batch = next(iter(data.train_dataloader()))
    assert batch["x"].shape == (8, 30) and set(batch) == {"idx", "seed", "x", "label"}


def test_paper_table_offline_names_the_folder(tmp_path, monkeypatch):
    from zoo.core.datasets import MissingDatasetError
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    with pytest.raises(MissingDatasetError, match="tabular"):
        load_table("jannis", download=False)
