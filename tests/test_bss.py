"""Batch Styles Standardization (``zoo/bss``): the amplitude swap against FDA's own function, BSS's batch rules by the
paper's Algorithm 1 (there is no official BSS code: "the full code will be released upon acceptance", and we found
none), and the module's plumbing (the switch, the normalisation round trip, the draws, bf16)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.bss import BSSBYOL, BSSSimCLR, low_frequency_mask, standardize_styles
from zoo.ssl.encoders import timm_encoder

# ------------------------------------------------------------------------------------ FDA's amplitude swap
# Golden numbers: YanchaoYang/FDA @ b9a0cdf0bcc9b787c00e39df73eda5673706f219, utils/__init__.py,
# FDA_source_to_target_np(src, trg, L) (numpy; its torch twin uses the removed torch.rfft), run on
# rng = np.random.default_rng(0); src, trg = rng.random((3, 8, 8)), rng.random((3, 8, 8)); then
# src2, trg2 = rng.random((3, 7, 6)), rng.random((3, 7, 6)). FDA does not clamp; BSS clamps to [0, 1] (the image
# range), so the pixels below are ones FDA leaves inside [0, 1], and the sums are of FDA's output clipped to [0, 1].
FDA_8x8 = {  # L -> (BSS area ratio giving FDA's block 2b + 1, out[0, 0, :4], out[2, 5, 3], clip(out).sum())
    0.15: ((3 / 8) ** 2, [0.6786833713794812, 0.3229979809247797, 0.09498279202742979, 0.06017586425533436],
           0.8673826129763224, 99.03533703912208),
    0.3: ((5 / 8) ** 2, [0.6522374337406331, 0.3486211681454493, 0.09506672034082975, 0.00495117554649893],
          0.8110018126156429, 99.13110971222214),
}
FDA_7x6_L02 = ([0.6080866144551321, 0.8954775766125647, 0.4546784763736931], 60.801744234545765)  # out[1, 3, :3]


def _fda_inputs():
    rng = np.random.default_rng(0)
    arrays = [rng.random((3, 8, 8)), rng.random((3, 8, 8)), rng.random((3, 7, 6)), rng.random((3, 7, 6))]
    return [torch.tensor(a, dtype=torch.float32) for a in arrays]


@pytest.mark.parametrize("L", sorted(FDA_8x8))
def test_amplitude_swap_matches_fda(L):
    src, trg, _, _ = _fda_inputs()
    ratio, row, pixel, clipped_sum = FDA_8x8[L]
    out = standardize_styles(src[None], trg, low_frequency_mask(8, 8, ratio))[0]
    torch.testing.assert_close(out[0, 0, :4], torch.tensor(row), atol=2e-6, rtol=0)
    assert float(out[2, 5, 3]) == pytest.approx(pixel, abs=2e-6)
    assert float(out.double().sum()) == pytest.approx(clipped_sum, abs=5e-5)


def test_amplitude_swap_matches_fda_on_a_non_square_image():
    _, _, src, trg = _fda_inputs()
    # FDA: b = floor(min(7, 6) * 0.2) = 1, a 3 x 3 block; sqrt(r) = 3 / 6.5 gives round(7 x .46) = round(6 x .46) = 3
    out = standardize_styles(src[None], trg, low_frequency_mask(7, 6, (3 / 6.5) ** 2))[0]
    torch.testing.assert_close(out[1, 3, :3], torch.tensor(FDA_7x6_L02[0]), atol=2e-6, rtol=0)
    assert float(out.double().sum()) == pytest.approx(FDA_7x6_L02[1], abs=5e-5)


# ------------------------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("size,b", [((8, 8), 1), ((8, 8), 2), ((9, 9), 2), ((7, 6), 1)])
def test_mask_is_fdas_centred_block(size, b):
    """An odd side 2b + 1 is FDA's ``[c - b, c + b]`` block around c = floor(side / 2) after fftshift."""
    h, w = size
    ratio = ((2 * b + 1) / h) * ((2 * b + 1) / w)
    mask = torch.fft.fftshift(low_frequency_mask(h, w, ratio))
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[h // 2 - b : h // 2 + b + 1, w // 2 - b : w // 2 + b + 1] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("ratio", [1e-6, 0.01, 0.1, 0.3, 1.0])
def test_mask_area_and_dc(ratio):
    mask = low_frequency_mask(64, 64, ratio)
    assert mask[0, 0]  # the DC term (mean colour) is always part of the style
    side = max(1, round(ratio ** 0.5 * 64))
    assert int(mask.sum()) == side * side
    if side % 2:  # odd sides are symmetric under k -> -k: the swapped spectrum stays Hermitian
        assert torch.equal(mask, torch.roll(mask.flip(0, 1), (1, 1), (0, 1)))


# ----------------------------------------------------------------------------- BSS's rules (Algorithm 1)
def _mid_grey_batch(n=5, size=16, seed=0):
    """Images in [0.4, 0.6] whose low-frequency swap stays inside [0, 1] (no clamping), so the spectra are exact."""
    g = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(n, 3, size, size, generator=g)


def test_every_image_takes_the_style_amplitude_and_keeps_its_phase():
    images = _mid_grey_batch()
    mask = low_frequency_mask(16, 16, (5 / 16) ** 2)
    out = standardize_styles(images, images[2], mask)
    assert 0 < float(out.min()) and float(out.max()) < 1  # no clamping: the spectra below are exact
    spectrum, before, style = torch.fft.fft2(out), torch.fft.fft2(images), torch.fft.fft2(images[2])
    for i in range(len(images)):
        torch.testing.assert_close(spectrum[i].abs()[:, mask], style.abs()[:, mask], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(spectrum[i].abs()[:, ~mask], before[i].abs()[:, ~mask], atol=1e-4, rtol=1e-5)
        phase_error = torch.angle(spectrum[i] * before[i].conj())  # phase difference, wrapped to (-pi, pi]
        torch.testing.assert_close(phase_error, torch.zeros_like(phase_error), atol=1e-3, rtol=0)
    # one style for the batch: every image now has the style image's per-channel mean (its DC term)
    torch.testing.assert_close(out.mean((2, 3)), images[2].mean((1, 2)).expand(5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], images[2], atol=1e-5, rtol=0)  # the style image is itself


def test_clamps_to_the_image_range():
    images = torch.zeros(2, 3, 8, 8)
    images[0, :, :4] = 1.0  # half white: its bright DC pushed onto the black image overshoots
    out = standardize_styles(images, images[0], low_frequency_mask(8, 8, 0.5))
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_float32_under_bf16_autocast():
    images = _mid_grey_batch(3, 8)
    mask = low_frequency_mask(8, 8, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = standardize_styles(images.bfloat16(), images[0].bfloat16(), mask)
    assert out.dtype == torch.float32
    reference = standardize_styles(images.bfloat16().float(), images[0].bfloat16().float(), mask)
    torch.testing.assert_close(out, reference)


# ------------------------------------------------------------------------------------------------ module
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def _module(cls=BSSSimCLR, **kwargs):
    torch.manual_seed(0)
    network = timm_encoder("resnet18", model_kwargs={"channels": [8, 8, 16, 16]})
    extra = {"projector_hidden_dim": 32, "projector_out_dim": 16, "predictor_hidden_dim": 32} if cls is BSSBYOL \
        else {"projector_out_dim": 16}
    module = cls(network, num_classes=7, **extra, **kwargs)
    module.pixel_mean, module.pixel_std = MEAN, STD  # what setup reads from the data module
    if cls is BSSBYOL:
        module.total_steps = 10  # K of the target-decay schedule, set by on_fit_start in a Trainer
    return module


def _batch(n=6, size=16):
    g = torch.Generator().manual_seed(1)
    views = {name: (torch.randint(0, 256, (n, 3, size, size), generator=g).float() - MEAN) / STD
             for name in ("view1", "view2")}
    return {**views, "label": torch.arange(n) % 7, "idx": torch.arange(n)}


def test_switch_off_is_the_host():
    module, batch = _module(bss_p=0.0), _batch()
    out, ratio = module.standardize_views(batch)
    assert ratio == 0.0 and all(torch.equal(out[k], batch[k]) for k in ("view1", "view2"))


@pytest.mark.parametrize("cls", [BSSSimCLR, BSSBYOL])
def test_each_view_gets_one_style_of_its_own_batch(cls, monkeypatch):
    module, batch = _module(cls), _batch()
    draws = {0: (True, (3 / 16) ** 2, 0, 4), 1: (True, (3 / 16) ** 2, 0, 1)}  # view -> (apply, r, owner, index)
    monkeypatch.setattr(module, "style_draw", lambda view, world, local: draws[view])
    out, ratio = module.standardize_views(batch)
    assert ratio == pytest.approx((3 / 16) ** 2)
    for name, index in (("view1", 4), ("view2", 1)):
        pixels = (batch[name] * STD + MEAN) / 255  # the [0, 1] images the module standardises
        expected = standardize_styles(pixels, pixels[index], low_frequency_mask(16, 16, (3 / 16) ** 2))
        torch.testing.assert_close((out[name] * STD + MEAN) / 255, expected, atol=1e-5, rtol=0)
        assert out[name].is_contiguous(memory_format=torch.channels_last)
    loss, features, logs = module.ssl_step(batch)
    assert torch.isfinite(loss) and logs["bss_area_ratio"] > 0 and len(features) == 2


def test_draws_are_per_view_per_step_and_reproducible():
    module = _module()
    torch.manual_seed(0)
    first = [module.style_draw(view, 1, 64) for view in (0, 1)]
    assert first == [module.style_draw(view, 1, 64) for view in (0, 1)]  # a function of (seed, step, view)
    assert first[0] != first[1]  # independent styles for the two views
    seen = set()
    for seed in range(300):  # the style image is uniform over the global batch (4 ranks x 16 images)
        torch.manual_seed(seed)
        _, r, owner, index = module.style_draw(0, 4, 16)
        assert 0.01 <= r <= 0.2 and 0 <= owner < 4 and 0 <= index < 16
        seen.add((owner, index))
    assert len(seen) > 55


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="area_ratio"):
        _module(area_ratio=(0.3, 0.1))
    with pytest.raises(ValueError, match="bss_p"):
        _module(bss_p=1.5)
