"""FixMatch's pseudo-labels, mask and unlabeled loss against USB's implementation on fixed logits.

Golden numbers: microsoft/Semi-supervised-learning @ 1ef4cbe (merge of PR #254), produced by running
``FixedThresholdingHook.masking`` (semilearn/algorithms/hooks/masking.py), ``PseudoLabelingHook.gen_ulb_targets``
with ``use_hard_label=True`` (hooks/pseudo_label.py) and ``consistency_loss(..., 'ce', mask)``
(core/criterions/consistency.py) — the exact calls FixMatch.train_step makes — on the logits below
(torch.randn with Generator seed 2020; weak x3, strong x2), with p_cutoff 0.95, 0.8 and 0.5.
"""
import torch

from zoo.fixmatch.module import masked_consistency_loss, pseudo_labels

LOGITS_WEAK = torch.tensor([
    [-0.02600777894258499, -0.963760256767273, -3.8695807456970215, 0.4895309507846832, 0.6168213486671448],
    [-2.4432263374328613, 3.0670151710510254, -5.124904155731201, 3.4654462337493896, -1.0358195304870605],
    [-1.0011258125305176, -1.4079424142837524, -3.4513587951660156, 0.05163596570491791, -2.576756000518799],
    [-1.9178740978240967, -4.738010406494141, -0.6464797258377075, 1.4117947816848755, 0.3658562898635864],
    [-0.475006639957428, -3.5999135971069336, -1.6444863080978394, 2.9626972675323486, 0.4163603186607361],
    [-3.263263702392578, 1.5809555053710938, 5.54339599609375, 0.09770234674215317, 0.609481692314148],
    [0.5344506502151489, 6.911060333251953, -0.49081188440322876, -5.460302352905273, -0.8429909348487854],
    [-2.7226433753967285, -5.140560150146484, 1.3949586153030396, -5.118298053741455, 0.18758222460746765]])
LOGITS_STRONG = torch.tensor([
    [-3.624922275543213, 1.2482455968856812, 1.2114835977554321, -0.4000336825847626, -0.28439804911613464],
    [0.661333441734314, -1.6789476871490479, -2.613581418991089, -2.262345790863037, -1.9479243755340576],
    [3.842451333999634, 1.4922858476638794, -2.147670030593872, -4.432382583618164, 1.3602278232574463],
    [-1.7605304718017578, 0.03143768012523651, -3.795398712158203, 0.55885910987854, 0.8222524523735046],
    [-2.2155513763427734, -1.9257441759109497, -1.9067353010177612, -1.241318941116333, -0.6251828074455261],
    [-0.6641132235527039, -3.4574759006500244, 1.465179443359375, 2.1208138465881348, -1.3798526525497437],
    [-3.899427890777588, 2.2479071617126465, 0.8705217242240906, 0.523836076259613, 3.9451956748962402],
    [2.9410412311553955, 0.2787407338619232, 0.30815935134887695, 3.267866611480713, -3.5964746475219727]])
USB_PSEUDO_LABELS = [4, 3, 3, 3, 3, 2, 1, 2]
USB = {  # p_cutoff: (mask, loss)
    0.95: ([0, 0, 0, 0, 0, 1, 1, 0], 0.3831481337547302),
    0.8: ([0, 0, 0, 0, 1, 1, 1, 0], 0.5639447569847107),
    0.5: ([0, 1, 1, 1, 1, 1, 1, 1], 2.596215009689331),
}


def test_pseudo_labels_mask_and_loss_match_usb():
    for threshold, (mask_ref, loss_ref) in USB.items():
        labels, mask = pseudo_labels(LOGITS_WEAK, threshold)
        assert labels.tolist() == USB_PSEUDO_LABELS
        assert mask.tolist() == mask_ref
        loss = masked_consistency_loss(LOGITS_STRONG, labels, mask)
        assert abs(loss.item() - loss_ref) < 1e-6, (threshold, loss.item(), loss_ref)


def test_threshold_is_inclusive():
    # USB: max_probs.ge(p_cutoff) -> a confidence exactly at the threshold is kept (mask [1, 1] in USB)
    _, mask = pseudo_labels(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), 0.5)
    assert mask.tolist() == [1.0, 1.0]


def test_loss_is_averaged_over_all_unlabeled_samples():
    labels, mask = pseudo_labels(LOGITS_WEAK, 0.95)
    per_sample = torch.nn.functional.cross_entropy(LOGITS_STRONG, labels, reduction="none")
    assert torch.isclose(masked_consistency_loss(LOGITS_STRONG, labels, mask), (per_sample * mask).sum() / 8)


def test_no_gradient_through_pseudo_labels():
    weak = LOGITS_WEAK.clone().requires_grad_(True)
    strong = LOGITS_STRONG.clone().requires_grad_(True)
    labels, mask = pseudo_labels(weak, 0.5)
    masked_consistency_loss(strong, labels, mask).backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0
