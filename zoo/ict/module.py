"""Improved Techniques for Training Consistency Models (iCT; Song & Dhariwal, ICLR 2024).

A consistency model ``f(x, sigma)`` maps any point of the probability-flow ODE back to its clean end point, so a
sample is one network call on pure noise. *Consistency training* learns it from data alone: draw a clean
image ``x``, one noise ``z`` and two adjacent noise levels ``sigma_i < sigma_{i+1}`` of a Karras grid, and pull

    loss = lambda(sigma_i) * d( f_theta(x + sigma_{i+1} z, sigma_{i+1}),  f_teacher(x + sigma_i z, sigma_i) )

with ``f = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))`` (EDM scalings shifted so that
``f(x, sigma_min) = x`` exactly). iCT's changes to the original consistency training (CT; Song et al., ICML 2023)
are separate switches here, so a run can turn each one back:

- ``teacher``: ``stopgrad`` = the student itself with a stopped gradient (iCT) | ``ema`` = an EMA teacher with
  CT's decay ``mu(k) = exp(s0 ln mu0 / N(k))``;
- ``distance``: ``pseudo_huber`` ``sqrt(||a-b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)`` (iCT) | ``l2``;
- ``noise_sampling``: ``lognormal`` = pair ``i`` with probability ``erf((ln s_{i+1} - Pmean) / (sqrt2 Pstd)) -
  erf((ln s_i - Pmean) / (sqrt2 Pstd))`` (iCT) | ``uniform`` over the pairs;
- ``weighting``: ``inverse_gap`` ``lambda = 1 / (sigma_{i+1} - sigma_i)`` (iCT) | ``uniform`` (``lambda = 1``);
- ``curriculum``: ``ict`` ``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2 floor(s1/s0) + 1))``
  | ``ct`` ``N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1``.
The rest is shared: both passes use the same ``z`` and the same dropout mask (the RNG state is replayed for the
teacher pass, as in CM's code and iCT Sec. 3.1); an EMA of the weights (0.99993) is used only for evaluation and
sampling; samples take 1 step (``sigma_max``) or 2 steps (then ``sigma = 0.821``), clipped to [-1, 1].

Where this follows what: there is no official iCT code. Formulas follow the paper; ``c_noise = ln(sigma) / 4``, the
network (``zoo/ict/unet.py``), the clipping of every sampling step, CT's ``mu(k)`` (computed from ``N(k) - 1`` as
``openai/consistency_models``' ``create_ema_and_scales_fn`` does, where the CM paper writes ``N(k)``) and the L2
distance as a per-image *mean* of squares follow the CM code (``openai/consistency_models_cifar10``). Unlike the
diffusers research example, the pseudo-Huber distance takes the norm over the whole image (the paper's
``||a - b||``; diffusers applies it per element) and ``c_in = 1/sqrt(sigma^2 + sigma_d^2)``, ``c_skip`` and ``c_out``
use the paper's ``sigma - sigma_min`` form (diffusers' training script drops the shift and the square root).
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn

from zoo.core.media import wandb_loggers
from zoo.core.module import ZooModule
from zoo.core.teacher import EMATeacher, StopGradTeacher

__all__ = ["ICT", "karras_sigmas", "ict_num_points", "ct_num_points", "ct_teacher_decay", "lognormal_pair_probs",
           "inverse_gap_weights", "pseudo_huber", "mean_squared", "huber_c", "edm_scalings", "consistency_function",
           "multistep_sample"]


# ---------------------------------------------------------------------------------------- the paper's formulas
def karras_sigmas(num_points: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
                  ) -> torch.Tensor:
    """The Karras grid of ``num_points`` noise levels, increasing from ``sigma_min`` to ``sigma_max`` (float64)."""
    ramp = torch.linspace(0, 1, num_points, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def ict_num_points(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's curriculum: ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1``, doubling every ``K'`` of ``K`` steps
    (``K'`` at least 1, so that runs shorter than the number of doublings work)."""
    k_prime = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** math.floor(step / k_prime), s1) + 1


def ct_num_points(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """CT's curriculum: ``N(k) = max(ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1), 1) + 1``."""
    intervals = math.ceil(math.sqrt(step / total_steps * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1)
    return max(intervals, 1) + 1


def ct_teacher_decay(num_points: int, s0: int = 2, mu0: float = 0.9) -> float:
    """CT's teacher EMA ``mu = exp(s0 ln(mu0) / (N - 1))`` (CM code; ``mu0`` when ``N - 1 = s0``)."""
    return math.exp(s0 * math.log(mu0) / (num_points - 1))


def lognormal_pair_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(i) for the pair ``(sigma_i, sigma_{i+1})``: the lognormal mass between them, normalised."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def inverse_gap_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i), one weight per pair."""
    return 1.0 / (sigmas[1:] - sigmas[:-1])


def huber_c(image_shape: Sequence[int]) -> float:
    """The paper's pseudo-Huber ``c = 0.00054 * sqrt(d)`` for images of ``d = C*H*W`` values (0.03 on CIFAR-10)."""
    return 0.00054 * math.sqrt(math.prod(image_shape))


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` per sample, the norm over all of a sample's values.

    Computed as ``d^2 / (sqrt(d^2 + c^2) + c)``, the same value without subtracting two nearly equal numbers: the
    direct form cancels catastrophically in float32 once ``d^2 << c^2`` (late training), e.g. a relative error of
    ~3e-4 at d^2 = 3e-6, c = 0.03. ``d^2`` is summed in float32 at least (bf16 inputs are upcast)."""
    squared = (a - b).float().pow(2).flatten(1).sum(1)
    return squared / ((squared + c * c).sqrt() + c)


def mean_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CT's squared L2 distance, as a per-sample mean over the values (CM code)."""
    return (a - b).float().pow(2).flatten(1).mean(1)


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """``c_skip, c_out, c_in, c_noise``; ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0`` exactly."""
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


def consistency_function(network: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5,
                         sigma_min: float = 0.002) -> torch.Tensor:
    """``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` for noisy images ``x`` and per-sample ``sigma``."""
    c_skip, c_out, c_in, c_noise = (c.view(-1, *[1] * (x.ndim - 1)) for c in edm_scalings(sigma, sigma_data,
                                                                                             sigma_min))
    return c_skip * x + c_out * network(c_in * x, c_noise.flatten()).to(x.dtype)


@torch.no_grad()
def multistep_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noises: torch.Tensor,
                     sigmas: Sequence[float], sigma_min: float = 0.002) -> list[torch.Tensor]:
    """Consistency sampling: ``x = f(sigma_0 z_0)``, then ``x = f(x + sqrt(s^2 - sigma_min^2) z, s)`` for each next
    ``s``; every step clipped to [-1, 1]. ``noises[j]`` is the standard normal noise of step ``j``. Returns the
    sample after each step (entry ``j`` is the ``j + 1``-step sample)."""
    samples = []
    for j, sigma in enumerate(sigmas):
        noisy = noises[j] * sigma if j == 0 else samples[-1] + math.sqrt(sigma ** 2 - sigma_min ** 2) * noises[j]
        x = denoise(noisy, torch.full((noisy.shape[0],), sigma, device=noisy.device, dtype=noisy.dtype))
        samples.append(x.clamp(-1, 1))
    return samples


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ------------------------------------------------------------------------------------------------- the module
class ICT(ZooModule):
    """iCT, and original CT through the switches. Defaults: the paper's CIFAR-10 setting.

    Args:
        network: ``F_theta(x, c_noise)``, e.g. :class:`zoo.ict.unet.NCSNpp`.
        teacher, distance, noise_sampling, weighting, curriculum: see the module docstring (iCT's are the defaults).
        s0, s1: curriculum start and end (iCT 10 / 1280; CT on CIFAR-10 2 / 150).
        total_steps: ``K`` of the curriculum; ``None`` takes ``trainer.max_steps`` (a short run sets its own K).
        teacher_mu0: CT's ``mu0`` (0.9), for ``teacher="ema"`` only.
        sigma_min, sigma_max, rho, sigma_data: the EDM/Karras constants.
        p_mean, p_std: the lognormal noise distribution.
        pseudo_huber_c: ``None`` = 0.00054 sqrt(C*H*W).
        two_step_sigma: the intermediate noise level of 2-step sampling (0.821 on CIFAR-10).
        fd_features: log ``val/fd_<dataset>_cnn``, the Fréchet distance in the features of a small classifier
            trained on the same data (see ``zoo.ict.train_feature_net``; not comparable to published FIDs).
        fid: also log ``val/fid`` with Inception-v3 (its weights must be on disk; see ``zoo.core.metrics``).
        grid_every_n_val: log a W&B grid of 1- and 2-step samples every this many validations.
        The optimisation arguments are the base's: RAdam, lr 1e-4, constant, EMA 0.99993 for evaluation only.
    """

    def __init__(self, network: nn.Module, teacher: Literal["stopgrad", "ema"] = "stopgrad",
                 distance: Literal["pseudo_huber", "l2"] = "pseudo_huber",
                 noise_sampling: Literal["lognormal", "uniform"] = "lognormal",
                 weighting: Literal["inverse_gap", "uniform"] = "inverse_gap",
                 curriculum: Literal["ict", "ct"] = "ict", s0: int = 10, s1: int = 1280,
                 total_steps: int | None = None, teacher_mu0: float = 0.9, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5, p_mean: float = -1.1,
                 p_std: float = 2.0, pseudo_huber_c: float | None = None, two_step_sigma: float = 0.821,
                 fd_features: bool = True, fid: bool = False, grid_every_n_val: int = 1, optimizer: str = "radam",
                 lr: float = 1e-4, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 ema_decay: float | None = 0.99993, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=ema_decay, **base)
        for name, value, allowed in [("teacher", teacher, ("stopgrad", "ema")),
                                     ("distance", distance, ("pseudo_huber", "l2")),
                                     ("noise_sampling", noise_sampling, ("lognormal", "uniform")),
                                     ("weighting", weighting, ("inverse_gap", "uniform")),
                                     ("curriculum", curriculum, ("ict", "ct"))]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.distance, self.noise_sampling, self.weighting, self.curriculum = (distance, noise_sampling, weighting,
                                                                               curriculum)
        self.s0, self.s1, self.total_steps, self.teacher_mu0 = s0, s1, total_steps, teacher_mu0
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = sigma_min, sigma_max, rho, sigma_data
        self.p_mean, self.p_std, self.pseudo_huber_c = p_mean, p_std, pseudo_huber_c
        self.two_step_sigma, self.grid_every_n_val = two_step_sigma, grid_every_n_val
        self.fd_features, self.fid = fd_features, fid
        # CT's teacher runs in training mode, so that it applies the student's dropout mask (replayed RNG state)
        self.teacher = EMATeacher(network, train_mode=True) if teacher == "ema" else StopGradTeacher(network)
        self._schedule: tuple | None = None
        self._sampled_sigmas: list[torch.Tensor] = []
        self._evaluation = None  # metrics and feature network, kept out of the checkpoint (see setup)
        self._validations = 0

    # ------------------------------------------------------------------ schedule
    def num_points(self, step: int) -> int:
        total = self.total_steps or (self.trainer.max_steps if self._trainer is not None else -1)
        if total is None or total <= 0:
            raise ValueError("the curriculum needs K: set model.total_steps or trainer.max_steps")
        num_points = ict_num_points if self.curriculum == "ict" else ct_num_points
        return num_points(step, total, self.s0, self.s1)

    def noise_schedule(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Karras grid of the current ``N(k)``, the probability of each adjacent pair, and each pair's weight."""
        n = self.num_points(step)
        if self._schedule is None or self._schedule[:2] != (n, self.device):
            sigmas = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)
            probs = (lognormal_pair_probs(sigmas, self.p_mean, self.p_std) if self.noise_sampling == "lognormal"
                     else torch.full((n - 1,), 1 / (n - 1), dtype=torch.float64))
            weights = inverse_gap_weights(sigmas) if self.weighting == "inverse_gap" else torch.ones(n - 1).double()
            self._schedule = (n, self.device, *(t.to(self.device) for t in (sigmas, probs, weights)))
        return self._schedule[2:]

    def teacher_decay_at(self, step: int) -> float:
        return ct_teacher_decay(self.num_points(step), self.s0, self.teacher_mu0)

    # ------------------------------------------------------------------ training
    def consistency(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return consistency_function(network, x, sigma.to(x.dtype), self.sigma_data, self.sigma_min)

    def student_and_teacher(self, x: torch.Tensor, noise: torch.Tensor, sigma_student: torch.Tensor,
                            sigma_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both passes on the same noise; the teacher replays the student's RNG state (same dropout mask)."""
        shape = (-1, *[1] * (x.ndim - 1))
        rng = _rng_state(x.device)
        student = self.consistency(self.network, x + sigma_student.view(shape).to(x.dtype) * noise, sigma_student)
        _set_rng_state(rng, x.device)
        with torch.no_grad():
            teacher = self.consistency(self.teacher, x + sigma_teacher.view(shape).to(x.dtype) * noise, sigma_teacher)
        return student, teacher

    def distance_fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.distance == "l2":
            return mean_squared(a, b)
        c = self.pseudo_huber_c if self.pseudo_huber_c is not None else huber_c(a.shape[1:])
        return pseudo_huber(a, b, c)

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # distinct noise and dropout per rank (seed_everything seeds all alike)
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        sigmas, probs, weights = self.noise_schedule(self.global_step)
        i = torch.multinomial(probs, x.shape[0], replacement=True)
        noise = torch.randn_like(x)
        student, teacher = self.student_and_teacher(x, noise, sigmas[i + 1], sigmas[i])
        loss = (weights[i].float() * self.distance_fn(student, teacher)).mean()

        self._sampled_sigmas.append(sigmas[i + 1].detach().float().cpu())
        logs = {"train/loss": loss, "train/num_points": float(len(sigmas))}
        if isinstance(self.teacher, EMATeacher):
            logs["train/teacher_decay"] = self.teacher_decay_at(self.global_step)
        self.log_dict(logs, prog_bar=False)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)  # also updates the evaluation EMA
        if isinstance(self.teacher, EMATeacher):
            self.teacher.update(self.network, self.teacher_decay_at(self.global_step))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (self.global_step % self.trainer.log_every_n_steps == 0) and self._sampled_sigmas:
            experiment = self._wandb()
            if experiment is not None:
                import wandb

                sigmas = torch.cat(self._sampled_sigmas)
                experiment.log({"train/log_sigma_student": wandb.Histogram(sigmas.log().numpy()),
                                "trainer/global_step": self.global_step})
            self._sampled_sigmas.clear()

    # ------------------------------------------------------------------ sampling
    def sampling_sigmas(self, steps: int) -> list[float]:
        if steps not in (1, 2):
            raise ValueError(f"steps must be 1 or 2, got {steps}")
        return [self.sigma_max, self.two_step_sigma][:steps]

    @torch.no_grad()
    def sample(self, noises: torch.Tensor, steps: int, ema: bool = True) -> list[torch.Tensor]:
        """The 1-, ..., ``steps``-step samples in [-1, 1] from standard normal ``noises`` (steps, B, C, H, W);
        the ``k``-step sample continues the ``k - 1``-step one."""
        network = self.ema.module if ema and self.ema is not None else self.network
        denoise = lambda x, sigma: self.consistency(network, x, sigma)  # noqa: E731
        return multistep_sample(denoise, noises, self.sampling_sigmas(steps), self.sigma_min)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The consistency function of the evaluation (EMA) network."""
        return self.consistency(self.ema.module if self.ema is not None else self.network, x, sigma)

    def predict_step(self, batch: torch.Tensor, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """``batch``: standard normal noise of shape (2, B, C, H, W); 1-step uses ``batch[0]`` only."""
        one_step, two_step = self.sample(batch, 2)
        return {"one_step": one_step, "two_step": two_step}

    # ------------------------------------------------------------------ evaluation
    @property
    def expected_metrics(self) -> tuple[str, ...]:
        names = ["train/loss"]
        if self.fd_features:
            names += [f"val/{self.fd_name}", f"val/{self.fd_name}_2step"]
        return tuple(names)

    @property
    def fd_name(self) -> str:
        dataset = getattr(getattr(self._trainer, "datamodule", None), "dataset", "data")
        return f"fd_{dataset}_cnn"

    def prepare_data(self) -> None:
        if self.fd_features:  # trains the feature classifier once per machine (local rank 0), then it is cached
            from .train_feature_net import load_feature_net

            load_feature_net(self.trainer.datamodule)

    def setup(self, stage: str) -> None:
        if self._evaluation is not None or stage not in ("fit", "validate"):
            return
        from zoo.core.metrics import frechet_distance, inception_fid

        evaluation = {}
        if self.fd_features:
            from .train_feature_net import load_feature_net

            net = load_feature_net(self.trainer.datamodule)
            evaluation["net"] = net
            for steps in (1, 2):
                # fed features, not images: the real images are embedded once for both metrics
                evaluation[f"fd{steps}"] = frechet_distance(nn.Identity(), net.num_features)
        if self.fid:
            for steps in (1, 2):
                evaluation[f"fid{steps}"] = inception_fid()  # raises, naming the path, without the weights
        self._evaluation = evaluation  # a plain dict: not submodules, so not in the checkpoint

    def evaluation_samples(self, real: torch.Tensor, batch_idx: int) -> dict[int, torch.Tensor]:
        """1- and 2-step samples for an evaluation batch, from noise fixed by the batch index (and rank)."""
        generator = torch.Generator(self.device).manual_seed(1_000_003 * batch_idx + self.global_rank)
        noises = torch.randn((2, *real.shape), generator=generator, device=self.device, dtype=real.dtype)
        return dict(enumerate(self.sample(noises, 2), start=1))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        real = batch["image"]
        for item in self._evaluation.values():
            item.to(self.device)
        samples = self.evaluation_samples(real, batch_idx)
        if "net" in self._evaluation:
            features = self._evaluation["net"].features
            real_features = features(real)
            for steps, images in samples.items():
                self._evaluation[f"fd{steps}"].update(real_features, real=True)
                self._evaluation[f"fd{steps}"].update(features(images), real=False)
        if self.fid:
            to_rgb = lambda im: ((im + 1) / 2).expand(-1, 3, -1, -1)  # noqa: E731
            for steps, images in samples.items():
                self._evaluation[f"fid{steps}"].update(to_rgb(real), real=True)
                self._evaluation[f"fid{steps}"].update(to_rgb(images), real=False)
        if batch_idx == 0:
            self._grid = {steps: images[:64].detach().cpu() for steps, images in samples.items()}

    def on_validation_epoch_end(self) -> None:
        names = {"fd1": f"val/{self.fd_name}", "fd2": f"val/{self.fd_name}_2step", "fid1": "val/fid",
                 "fid2": "val/fid_2step"}
        for key, metric in self._evaluation.items():
            if key in names:
                self.log(names[key], metric.compute().float(), sync_dist=False, rank_zero_only=True)
                metric.reset()
        experiment = self._wandb()
        if experiment is not None and not self.trainer.sanity_checking and getattr(self, "_grid", None):
            if self._validations % self.grid_every_n_val == 0:
                import wandb
                from torchvision.utils import make_grid

                experiment.log({f"samples/{steps}_step": wandb.Image(make_grid((images + 1) / 2, nrow=8))
                                for steps, images in self._grid.items()} | {"trainer/global_step": self.global_step})
            self._validations += 1

    def _wandb(self):
        loggers = wandb_loggers(self._trainer)
        return loggers[0].experiment if loggers else None
