"""Label propagation (McKee et al. 2022 / CRW's procedure) and the DAVIS J and F measures.

The propagation is checked against hand-made feature maps and a plain-loop reference of CRW's top-k softmax
(``ajabri/videowalk`` ``code/utils/test_utils.py``, not importable here: it needs cv2/CUDA paths); J and F against
hand-computed masks and against golden numbers of the official DAVIS toolkit run on fixed masks.
"""
import math

import numpy as np
import pytest
import torch

from zoo.core.datasets import MissingDatasetError
from zoo.label_prop_factors.davis import boundary_f_measure, load_davis2016, region_similarity, sequence_scores
from zoo.label_prop_factors.propagation import DenseFeatures, LabelPropagation, context_frames, radius_mask


def _two_frame_case(source=(1, 1), target=(2, 3), size=(4, 5)):
    """Frame 0: one distinctive feature at ``source`` labelled foreground; frame 1: that feature at ``target``."""
    h, w = size
    features = torch.zeros(2, 2, h, w)
    features[:, 0] = 1.0                      # background feature everywhere
    features[0, :, source[0], source[1]] = torch.tensor([0.0, 1.0])
    features[1, :, target[0], target[1]] = torch.tensor([0.0, 1.0])
    label = torch.zeros(2, h, w)
    label[0] = 1
    label[0, source[0], source[1]], label[1, source[0], source[1]] = 0, 1
    return features, label


def test_a_label_moves_with_the_matching_feature():
    features, label = _two_frame_case()
    out = LabelPropagation(topk=1, context=1)(features, label)
    assert out.shape == (2, 2, 4, 5)
    torch.testing.assert_close(out[0], label)                     # frame 0 is the given label
    foreground = out[1, 1] > 0.5
    assert foreground.nonzero().tolist() == [[2, 3]]              # the label followed the feature, nowhere else


def test_topk_keeps_exactly_k_and_matches_a_loop_reference():
    torch.manual_seed(0)
    query, keys = torch.randn(8, 6), torch.randn(3, 8, 6)
    allowed = torch.ones(3, 6, 6, dtype=torch.bool)
    prop = LabelPropagation(topk=4, temperature=0.2)
    weights, index = prop.weights(query, keys, allowed)
    assert weights.shape == index.shape == (6, 4)
    assert len(set(index[0].tolist())) == 4
    torch.testing.assert_close(weights.sum(1), torch.ones(6))
    flat_keys = keys.permute(1, 0, 2).reshape(8, -1)              # context positions frame by frame
    for q in range(6):
        scores = [float(query[:, q] @ flat_keys[:, k]) / 0.2 for k in range(flat_keys.shape[1])]
        best = sorted(range(len(scores)), key=lambda k: -scores[k])[:4]
        expected = np.exp([scores[k] for k in best]); expected /= expected.sum()
        assert index[q].tolist() == best
        np.testing.assert_allclose(weights[q].numpy(), expected, rtol=1e-5)


def test_the_radius_mask_excludes_far_pixels():
    mask = radius_mask(5, 6, 2.0)
    for q in range(30):
        for k in range(30):
            distance = math.hypot(q // 6 - k // 6, q % 6 - k % 6)
            assert bool(mask[q, k]) == (distance < 2.0)
    assert radius_mask(3, 3, math.inf).all()
    # a matching feature 4 pixels away in a recent frame is out of reach with radius 2, within reach with 12
    features, label = _two_frame_case(source=(0, 0), target=(0, 4), size=(2, 6))
    near = LabelPropagation(topk=1, context=1, keep_first=False, radius=12)(features, label)
    far = LabelPropagation(topk=1, context=1, keep_first=False, radius=2)(features, label)
    assert near[1, 1, 0, 4] > 0.99 and far[1, 1, 0, 4] < 0.01
    # the first frame is global (CRW's long-term memory) unless restrict_first
    kept = LabelPropagation(topk=1, context=1, radius=2)(features, label)
    restricted = LabelPropagation(topk=1, context=1, radius=2, restrict_first=True)(features, label)
    assert kept[1, 1, 0, 4] > 0.99 and restricted[1, 1, 0, 4] < 0.01


def test_context_is_the_first_frame_plus_the_previous_n():
    assert context_frames(5, 3) == [0, 2, 3, 4]
    assert context_frames(1, 3) == [0, 0, 0, 0]                   # padded with frame 0 (CRW)
    assert context_frames(2, 3, keep_first=False) == [0, 0, 1]
    assert context_frames(9, 0) == [0]


def test_propagated_labels_chain_through_recent_frames():
    """Frame 2 matches only frame 1's moved feature: the label must come from frame 1's prediction."""
    features = torch.zeros(3, 2, 1, 6)
    features[:, 0] = 1.0
    for t, x in enumerate([0, 2, 4]):
        features[t, :, 0, x] = torch.tensor([0.0, 1.0])
    label = torch.zeros(2, 1, 6); label[0] = 1; label[:, 0, 0] = torch.tensor([0.0, 1.0])
    out = LabelPropagation(topk=1, context=1, keep_first=False, radius=3)(features, label)
    assert out[1, 1, 0, 2] > 0.99 and out[2, 1, 0, 4] > 0.99


def test_bad_factors_raise():
    for kwargs in ({"topk": 0}, {"temperature": 0.0}, {"radius": 0}, {"context": 0, "keep_first": False}):
        with pytest.raises(ValueError):
            LabelPropagation(**kwargs)


def test_dense_features_reach_the_requested_stride():
    from zoo.ssl.encoders import timm_encoder

    torch.manual_seed(0)
    encoder = timm_encoder("resnet18")
    x = torch.rand(2, 3, 64, 96)
    assert DenseFeatures(encoder)(x).shape == (2, 256, 8, 12)                  # CRW: layer3 at stride 8
    assert DenseFeatures(encoder, stride=16)(x).shape == (2, 256, 4, 6)
    assert DenseFeatures(encoder, layer="layer4", stride=8)(x).shape == (2, 512, 8, 12)
    assert encoder.layer3[0].conv1.stride == (2, 2)                            # the encoder itself untouched
    with pytest.raises(ValueError):
        DenseFeatures(encoder, layer="layer2", stride=4)


# ------------------------------------------------------------------------------------------------ J and F
def test_region_similarity_by_hand():
    truth, pred = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    truth[2:6, 2:6], pred[3:7, 3:7] = True, True                  # 16 and 16 pixels, 9 shared
    assert region_similarity(truth, pred) == pytest.approx(9 / 23)
    assert region_similarity(truth, np.zeros_like(pred)) == 0.0
    assert region_similarity(np.zeros_like(truth), np.zeros_like(pred)) == 1.0


def test_boundary_f_by_hand():
    truth = np.zeros((60, 80), bool); truth[20:40, 20:50] = True   # tolerance ceil(0.008 * 100) = 1 pixel
    assert boundary_f_measure(truth, truth) == 1.0
    assert boundary_f_measure(truth, np.roll(truth, 1, axis=1)) == 1.0   # every boundary pixel within 1 px
    far = np.zeros_like(truth); far[45:55, 60:75] = True
    assert boundary_f_measure(truth, far) == 0.0                  # no boundary pixel within tolerance
    assert boundary_f_measure(truth, np.zeros_like(truth)) == 0.0
    assert boundary_f_measure(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    # a 3-pixel shift right: the 2 vertical edges (20 px each) miss, the horizontal ones (30 px, 27 overlapping +
    # 1 within 1 px at each end) match: boundary maps lie on the pixel before each transition, so count them.
    shifted = np.roll(truth, 3, axis=1)
    from zoo.label_prop_factors.davis import boundary_map
    from scipy.ndimage import binary_dilation
    t_edges, p_edges = boundary_map(truth), boundary_map(shifted)
    disk = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    precision = (p_edges & binary_dilation(t_edges, disk)).sum() / p_edges.sum()
    recall = (t_edges & binary_dilation(p_edges, disk)).sum() / t_edges.sum()
    assert boundary_f_measure(truth, shifted) == pytest.approx(2 * precision * recall / (precision + recall))
    assert 0.3 < boundary_f_measure(truth, shifted) < 0.9


def _golden_masks():
    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    truth = (yy - 30) ** 2 / 15 ** 2 + (xx - 40) ** 2 / 20 ** 2 <= 1
    rect = np.zeros((h, w), bool); rect[18:44, 24:60] = True
    big_truth = np.zeros((240, 427), bool); big_truth[60:180, 100:300] = True
    big_pred = np.zeros((240, 427), bool); big_pred[64:186, 95:296] = True
    return truth, rect, np.roll(truth, (3, -5), axis=(0, 1)), big_truth, big_pred


def test_j_and_f_match_the_official_davis_toolkit():
    """Golden numbers: davisvideochallenge/davis2017-evaluation @ ac7c43fca936f9722837b7fbd337d284ba37004b,
    ``davis2017/metrics.py`` ``db_eval_iou`` / ``db_eval_boundary`` (cv2 + skimage) on these masks."""
    truth, rect, shifted, big_truth, big_pred = _golden_masks()
    assert region_similarity(truth, rect) == pytest.approx(0.8235867446393762, abs=1e-12)
    assert boundary_f_measure(truth, rect) == pytest.approx(0.5285895806861499, abs=1e-12)
    assert region_similarity(truth, shifted) == pytest.approx(0.6607460035523979, abs=1e-12)
    assert boundary_f_measure(truth, shifted) == pytest.approx(0.19444444444444445, abs=1e-12)
    assert boundary_f_measure(truth, rect, bound_th=2) == pytest.approx(0.7667103538663171, abs=1e-12)
    assert region_similarity(big_truth, big_pred) == pytest.approx(0.8817187621189793, abs=1e-12)
    assert boundary_f_measure(big_truth, big_pred) == pytest.approx(0.5060914433137452, abs=1e-12)


def test_sequence_scores_leave_out_the_first_and_last_frame():
    truth = np.zeros((4, 10, 10), np.int64); truth[:, 2:6, 2:6] = 1
    pred = truth.copy(); pred[0] = 0; pred[3] = 0                 # wrong only where DAVIS does not score
    assert sequence_scores(truth, pred) == {"J": 1.0, "F": 1.0}
    pred[1] = 0
    assert sequence_scores(truth, pred) == {"J": 0.5, "F": 0.5}


# ------------------------------------------------------------------------------------------------ data
def test_a_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_SHARED_DATA", str(tmp_path))
    with pytest.raises(MissingDatasetError, match="davis2016"):
        load_davis2016()


def test_the_davis2016_loader_reads_frames_and_binary_masks():
    (seq,) = load_davis2016(sequences=["blackswan"], max_frames=3)  # the shared offline data: no skip
    assert seq.frames.shape == (3, 240, 427, 3) and seq.frames.dtype == np.uint8
    assert seq.masks.shape == (3, 240, 427) and set(np.unique(seq.masks)) == {0, 1}
