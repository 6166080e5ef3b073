"""iCT / CT: every formula against its reference on fixed inputs, the stop-gradient teacher, the shared dropout mask,
sampling, the baseline switches, the data module and the sampling entry point.

Reference constants were produced by running the reference code (script: /tmp/ict_ref/make_constants.py, gist in
each comment), outside this repository:
- [diffusers-script] huggingface/diffusers @ 58eb52c0 (file last changed in edcbe803),
  examples/research_projects/consistency_training/train_cm_ct_unconditional.py: get_karras_sigmas,
  get_discretization_steps, get_discretized_lognormal_weights, get_loss_weighting_schedule, extracted with ast
  and called as they are;
- [diffusers-scheduler] diffusers 0.32.2, CMStochasticIterativeScheduler (get_scalings_for_boundary_condition,
  scale_model_input, step);
- [cm] openai/consistency_models @ e32b69ee, cm/script_util.py create_ema_and_scales_fn (CT's N(k) and mu(k)).
Where the references differ from the paper (pseudo-Huber per element, c_in without the square root in the diffusers
script), the paper's formula is checked by an independent numpy computation instead, as said at each test.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from zoo.ict import module as ict
from zoo.ict.data import ImageDataModule
from zoo.ict.unet import NCSNpp

# [diffusers-script] get_karras_sigmas(11, 0.002, 80.0, 7.0, dtype=torch.float64)
KARRAS_11 = [0.002000000000000003, 0.01672075323499393, 0.08508720268939021, 0.3182832888392961, 0.9654169263318939,
             2.515218976147159, 5.838947631011886, 12.381576138540881, 24.408341786580095, 45.313734075226606, 80.0]
# [diffusers-script] get_karras_sigmas(21, ...)[::4] (every 4th point)
KARRAS_21_EVERY_4 = [0.002000000000000003, 0.08508720268939021, 0.9654169263318939, 5.838947631011886,
                     24.408341786580095, 80.0]
# [diffusers-script] get_discretization_steps(k, K, s_0=10, s_1=1280)
CURRICULUM = {400000: ([0, 49999, 50000, 100000, 149999, 150000, 349999, 350000, 399999],
                       [11, 11, 21, 41, 41, 81, 641, 1281, 1281]),
              1000: ([0, 124, 125, 250, 500, 875, 999], [11, 11, 21, 41, 161, 1281, 1281])}
# [diffusers-script] w = get_discretized_lognormal_weights(KARRAS_11, -1.1, 2.0); w / w.sum()
PAIR_PROBS_11 = [0.06263299250626118, 0.18173697971064973, 0.24550142196717026, 0.21349444702335396,
                 0.14244605802390178, 0.08060462167684372, 0.04107990622240077, 0.019580092241339202,
                 0.008943868413767812, 0.003979612214311476]
# [diffusers-script] get_loss_weighting_schedule(KARRAS_11)
LAMBDA_11 = [67.93130650562208, 14.627057686636897, 4.2882366360006925, 1.5452758782167901, 0.6452436942635345,
             0.30086691900566687, 0.15284376896063107, 0.08314787443813168, 0.04783454843576836,
             0.028829854506932862]
# [cm] create_ema_and_scales_fn("adaptive", 0.9, "progressive", 2, 150, 800000, None)(k) -> (mu, N)
CT_SCHEDULE = {0: (0.81, 2), 1: (0.9, 3), 1000: (0.9587315155141827, 6), 50000: (0.9943210236891104, 38),
               200000: (0.997194329519952, 76), 400000: (0.9980140403749149, 107),
               799999: (0.9985961794038429, 151), 800000: (0.9985961794038429, 151)}
# [diffusers-scheduler] CMStochasticIterativeScheduler(num_train_timesteps=40).set_timesteps(timesteps=[39, 30, 20,
# 10, 0]): sigmas, get_scalings_for_boundary_condition(sigmas), scale_model_input(1.0, t) at each timestep
SCHEDULER_SIGMAS = [80.0, 16.779890060424805, 2.2404396533966064, 0.13119736313819885, 0.0020000000949949026]
SCHEDULER_C_SKIP = [3.90629272263522e-05, 0.0008873190207949891, 0.047522987079820216, 0.9374110913322325, 1.0]
SCHEDULER_C_OUT = [0.49997773490522646, 0.4997186051612196, 0.4875597128049477, 0.12496692042689071,
                   9.49941426189721e-11]
SCHEDULER_C_IN = [0.012499755625734016, 0.05956870497875338, 0.43562461435111854, 1.934512013318293,
                  1.9999840260827841]
# [diffusers-scheduler] 2-step sampling, sigmas [80, 0.821] (scheduler.sigmas = [80, 0.821, 0.002]), model output
# tanh(scale_model_input(x)) - 0.3, float64 image (2, 1, 2, 2), torch.Generator().manual_seed(0) drawing the initial
# noise then one noise per step
TWO_STEP_SAMPLES = [-0.3242197481957334, -0.5409017294540329, -0.7881355067698808, 0.054138835729190676,
                    -0.8359135442909473, 0.08697903306638646, -0.653890076093735, 0.07956413768602145]


def tiny_net(dropout: float = 0.0, channels: int = 1, resolution: int = 8) -> NCSNpp:
    torch.manual_seed(0)
    return NCSNpp(img_resolution=resolution, in_channels=channels, model_channels=8, channel_mult=(1, 2),
                  num_blocks=1, attn_resolutions=(4,), dropout=dropout)


def tiny_module(**switches) -> ict.ICT:
    switches.setdefault("total_steps", 1000)
    return ict.ICT(tiny_net(switches.pop("dropout", 0.0)), fd_features=False, **switches)


def randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights: NCSN++ starts every branch's last layer at ~0, which hides dropout and F."""
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)


# ------------------------------------------------------------------------------------- formulas vs references
def test_karras_grid_matches_diffusers():
    torch.testing.assert_close(ict.karras_sigmas(11), torch.tensor(KARRAS_11, dtype=torch.float64), rtol=1e-14,
                               atol=0)
    torch.testing.assert_close(ict.karras_sigmas(21)[::4], torch.tensor(KARRAS_21_EVERY_4, dtype=torch.float64),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("total", sorted(CURRICULUM))
def test_ict_curriculum_matches_diffusers(total):
    steps, expected = CURRICULUM[total]
    assert [ict.ict_num_points(k, total) for k in steps] == expected


def test_ict_curriculum_short_runs_still_double():
    assert [ict.ict_num_points(k, 3) for k in range(3)] == [11, 21, 41]  # K' clamped to 1 when K < 8


def test_pair_probabilities_and_weights_match_diffusers():
    sigmas = torch.tensor(KARRAS_11, dtype=torch.float64)
    torch.testing.assert_close(ict.lognormal_pair_probs(sigmas), torch.tensor(PAIR_PROBS_11, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(ict.inverse_gap_weights(sigmas), torch.tensor(LAMBDA_11, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def test_ct_schedule_matches_official_consistency_models():
    for step, (mu, n) in CT_SCHEDULE.items():
        assert ict.ct_num_points(step, 800000, s0=2, s1=150) == n
        assert ict.ct_teacher_decay(n, s0=2, mu0=0.9) == pytest.approx(mu, rel=1e-12)


def test_preconditioning_matches_diffusers_scheduler():
    sigma = torch.tensor(SCHEDULER_SIGMAS, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = ict.edm_scalings(sigma, sigma_data=0.5, sigma_min=0.002)
    for ours, reference in [(c_skip, SCHEDULER_C_SKIP), (c_out, SCHEDULER_C_OUT)]:
        torch.testing.assert_close(ours, torch.tensor(reference, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # scale_model_input squares the scheduler's float32 sigmas: float32 precision
    torch.testing.assert_close(c_in, torch.tensor(SCHEDULER_C_IN, dtype=torch.float64), rtol=1e-6, atol=0)
    # c_noise: the CM CIFAR-10 code's cond_t = 0.25 * log(t) (diffusers' script uses 1000x that, plus 1e-44)
    torch.testing.assert_close(c_noise, torch.tensor(np.log(SCHEDULER_SIGMAS) / 4), rtol=1e-14, atol=0)


def test_boundary_condition_is_exact():
    net = tiny_net()
    randomise(net)  # a non-trivial F, so that only the scalings can make f(x, sigma_min) = x
    x = torch.randn(3, 1, 8, 8)
    out = ict.consistency_function(net, x, torch.full((3,), 0.002))
    assert torch.equal(out, x)
    assert not torch.allclose(ict.consistency_function(net, x, torch.full((3,), 0.01)), x)


def test_pseudo_huber_is_the_papers_per_sample_distance():
    """Independent numpy: sqrt(||a - b||^2 + c^2) - c per sample, c = 0.00054 sqrt(C*H*W). (The diffusers script
    applies the same formula per element and averages, which differs; its c, 0.00054 * res * sqrt(channels),
    equals ours.)"""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3, 32, 32)), rng.normal(size=(4, 3, 32, 32))
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    assert ict.huber_c((3, 32, 32)) == pytest.approx(0.00054 * 32 * math.sqrt(3), rel=1e-15)
    assert ict.huber_c((1, 32, 32)) == pytest.approx(0.01728, rel=1e-12)
    expected = np.sqrt(((a - b) ** 2).reshape(4, -1).sum(1) + c * c) - c
    ours = ict.pseudo_huber(torch.from_numpy(a), torch.from_numpy(b), c)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(ict.mean_squared(torch.from_numpy(a), torch.from_numpy(b)).numpy(),
                               ((a - b) ** 2).reshape(4, -1).mean(1), rtol=1e-6)
    # small differences: pseudo-Huber ~ ||a - b||^2 / (2c); large ones: ~ ||a - b||
    tiny = torch.full((1, 3, 32, 32), 1e-5, dtype=torch.float64)
    assert float(ict.pseudo_huber(tiny, 0 * tiny, c)) == pytest.approx(3 * 32 * 32 * 1e-10 / (2 * c), rel=1e-4)


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 3e-5, 1e-6])
def test_pseudo_huber_is_accurate_in_float32_for_small_differences(scale):
    """Late in training d^2 << c^2: the direct sqrt(d^2 + c^2) - c loses ~3e-4 relative accuracy in float32 at
    d^2 = 3e-6, c = 0.03. The stable form must match a float64 reference to float32 round-off at every scale."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 3, 32, 32))
    b = a + scale * rng.normal(size=a.shape)
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    d2 = ((a.astype(np.float32).astype(np.float64) - b.astype(np.float32).astype(np.float64)) ** 2).reshape(8, -1).sum(1)
    reference = d2 / (np.sqrt(d2 + c * c) + c)  # float64, on the very float32 inputs
    ours = ict.pseudo_huber(torch.from_numpy(a).float(), torch.from_numpy(b).float(), c)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), reference, rtol=2e-5)


def test_two_step_sampling_matches_diffusers_scheduler():
    net = lambda x, c_noise: torch.tanh(x) - 0.3  # noqa: E731  (the reference model ignored its timestep too)
    generator = torch.Generator().manual_seed(0)
    noises = torch.stack([torch.randn((2, 1, 2, 2), generator=generator, dtype=torch.float64) for _ in range(2)])
    denoise = lambda x, sigma: ict.consistency_function(net, x, sigma)  # noqa: E731
    samples = ict.multistep_sample(denoise, noises, [80.0, 0.821])[-1]
    torch.testing.assert_close(samples.flatten(), torch.tensor(TWO_STEP_SAMPLES, dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)


# ------------------------------------------------------------------------------------- training mechanics
def test_teacher_is_the_student_without_gradient():
    model = tiny_module()
    model.train()
    x, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    s_student, s_teacher = torch.tensor([1.0, 2.0, 0.5, 10.0]), torch.tensor([0.5, 1.0, 0.3, 5.0])
    student, teacher = model.student_and_teacher(x, noise, s_student, s_teacher)
    assert student.requires_grad and teacher.grad_fn is None and not teacher.requires_grad
    with torch.no_grad():  # the current weights, not a copy
        same = ict.consistency_function(model.network, x + s_teacher.view(-1, 1, 1, 1) * noise, s_teacher)
    torch.testing.assert_close(teacher, same, rtol=0, atol=0)
    model.distance_fn(student, teacher).mean().backward()
    assert all(p.grad is not None for p in model.network.parameters())
    # a teacher the sweep checks, with no state of its own: the checkpoint holds the student's weights once
    assert set(model.teachers()) == {"ema", "teacher"} and model.teacher.module is model.network
    assert not any(key.startswith("teacher.") for key in model.state_dict())


def test_same_dropout_mask_in_both_passes():
    model = tiny_module(dropout=0.5)
    randomise(model.network)
    model.train()
    x, noise, sigma = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8), torch.tensor([0.5, 1.0, 2.0, 4.0])
    student, teacher = model.student_and_teacher(x, noise, sigma, sigma)  # same input: equal iff same masks
    torch.testing.assert_close(student, teacher, rtol=0, atol=0)
    again = model.consistency(model.network, x + sigma.view(-1, 1, 1, 1) * noise, sigma)  # a fresh mask differs
    assert not torch.allclose(student, again)


def test_ema_teacher_runs_dropout_and_takes_no_gradient():
    network = tiny_net(dropout=0.5)
    randomise(network)
    model = ict.ICT(network, teacher="ema", total_steps=1000, fd_features=False)
    model.train()
    assert model.teacher.module.training and not model.ema.module.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    x, noise, sigma = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([1.0, 3.0])
    student, teacher = model.student_and_teacher(x, noise, sigma, sigma)
    torch.testing.assert_close(student, teacher, rtol=0, atol=0)  # equal weights at init, same dropout mask
    assert teacher.grad_fn is None


def _recipe(model: ict.ICT, step: int) -> dict:
    sigmas, probs, weights = model.noise_schedule(step)
    a, b = torch.linspace(-1, 1, 64).view(1, 1, 8, 8), torch.linspace(1, -1, 64).view(1, 1, 8, 8)
    return {"sigmas": sigmas, "probs": probs, "weights": weights, "distance": model.distance_fn(a, b),
            "teacher": type(model.teacher).__name__}


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not (a[k] == b[k] if isinstance(a[k], str) else
                                 a[k].shape == b[k].shape and torch.equal(a[k], b[k]))}


@pytest.mark.parametrize("switch, value, changes", [
    ("teacher", "ema", {"teacher"}),
    ("distance", "l2", {"distance"}),
    ("noise_sampling", "uniform", {"probs"}),
    ("weighting", "uniform", {"weights"}),
    ("curriculum", "ct", {"sigmas", "probs", "weights"}),
])
def test_each_baseline_switch_changes_exactly_its_part(switch, value, changes):
    step = 300
    ict_recipe = _recipe(tiny_module(), step)
    switched = tiny_module(**{switch: value})
    assert _changed(ict_recipe, _recipe(switched, step)) == changes
    recipe = _recipe(switched, step)
    n = len(recipe["sigmas"])
    if switch == "noise_sampling":
        torch.testing.assert_close(recipe["probs"], torch.full((n - 1,), 1 / (n - 1), dtype=torch.float64))
    if switch == "weighting":
        assert torch.equal(recipe["weights"], torch.ones(n - 1, dtype=torch.float64))
    if switch == "curriculum":  # s0=10, s1=1280 in both; only the shape of N(k) changed
        assert n == ict.ct_num_points(step, 1000, 10, 1280) != ict.ict_num_points(step, 1000)
    if switch == "teacher":
        assert switched.teacher_decay_at(step) == ict.ct_teacher_decay(n, 10, 0.9)


def test_ct_recipe_schedule():
    model = tiny_module(teacher="ema", distance="l2", noise_sampling="uniform", weighting="uniform",
                        curriculum="ct", s0=2, s1=150, total_steps=800000)
    for step, (mu, n) in CT_SCHEDULE.items():
        assert model.num_points(step) == n and model.teacher_decay_at(step) == pytest.approx(mu, rel=1e-12)


def test_unknown_switch_value_is_rejected():
    with pytest.raises(ValueError, match="distance"):
        tiny_module(distance="lpips")


# ------------------------------------------------------------------------------------- sampling, data, entry point
def test_one_and_two_step_sampling_shapes_and_range():
    model = tiny_module()
    randomise(model.ema)
    noise = torch.randn(2, 5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = model.predict_step(noise)
    for images in out.values():
        assert images.shape == (5, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(out["one_step"], model.sample(noise[:1], 1)[0])  # 1 step: only the first noise
    assert not torch.allclose(out["one_step"], out["two_step"])
    with pytest.raises(ValueError):
        model.sampling_sigmas(3)


def test_data_module_pads_mnist_to_32_in_minus_one_to_one():
    data = ImageDataModule(dataset="mnist", grayscale=True, pad_to=32, random_flip=False, batch_size=8,
                           eval_size=100, num_workers=0, steps_per_epoch=2, eval_batch_size=50)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = data.on_after_batch_transfer(batch, 0)
    images = batch["image"]
    assert images.shape == (8, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.all(images[:, :, :2] == -1) and torch.all(images[:, :, :, -2:] == -1)  # the zero padding
    assert len(data.val_dataloader().dataset) == 100


def test_sample_entry_point_writes_a_png_grid(tmp_path):
    from zoo.ict.sample import main

    config = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "ict_mnist.yaml").read_text())
    config["model"]["init_args"]["network"]["init_args"].update(model_channels=8, channel_mult=[1, 2])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))  # the CLI writes the resolved config here
    network = NCSNpp(**config["model"]["init_args"]["network"]["init_args"])
    torch.save({"state_dict": ict.ICT(network, fd_features=False).state_dict()}, run / "checkpoints" / "last.ckpt")
    for steps in (1, 2):
        out = tmp_path / f"grid{steps}.png"
        main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--steps", str(steps),
              "--num", "16"])
        assert Image.open(out).size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)  # make_grid: 4x4 images, padding 2


def test_offline_fd_is_named_like_validation_and_deterministic():
    """``sample.py --fd`` draws its noise from ``ICT.evaluation_samples``, as validation does: fixed per batch."""
    from zoo.ict.sample import offline_fd

    data_args = dict(dataset="mnist", grayscale=True, pad_to=32, random_flip=False, eval_size=24, eval_batch_size=12)
    model = ict.ICT(NCSNpp(img_resolution=32, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                           attn_resolutions=()), fd_features=False)
    randomise(model.ema)
    first = offline_fd(model, {"data": {"init_args": data_args}}, "cpu")
    assert set(first) == {"fd_mnist_cnn", "fd_mnist_cnn_2step"} and all(v > 0 for v in first.values())
    assert offline_fd(model, {"data": {"init_args": data_args}}, "cpu") == first
