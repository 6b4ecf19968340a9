"""The SOAR objective (shared/SOAR.md), as a pure function of tensors.

The model comes in as a ``velocity(latents, timesteps, cond)`` callable, every random draw comes in
as a :class:`Draws` (or from a passed generator, in the reference's order), and nothing here knows
about accelerate, processes, files or logging. Two exact optimisations over the reference:

* per-term backward: the normaliser of step 7 is known before any forward, so each term can be
  back-propagated (scaled by it) as soon as it is computed, and its graph freed: peak activation
  memory is one forward's for any K. Pass ``backward=`` to get this; without it the terms are summed
  into one loss with graph (the joint backward the reference does), and the gradients agree.
* the main pass's output, detached, is the conditional half of the CFG rollout (no second pass),
  or the whole rollout velocity for families whose sampler makes one pass (:class:`Rollout`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import Tensor

from soar_lite.config import SoarConfig

Cond = Mapping[str, Tensor]
Velocity = Callable[[Tensor, Tensor, Cond], Tensor]
Backward = Callable[[Tensor, bool], None]  # (scaled term, is_last_term_of_step) -> None


@dataclass(frozen=True)
class NoiseGrid:
    """The scheduler's training grid: sigmas[i] = shift(1 - i/N), descending from 1; timesteps = N sigmas."""

    sigmas: Tensor
    timesteps: Tensor
    shift: float

    @classmethod
    def from_scheduler(cls, scheduler: object) -> NoiseGrid:
        """Read a fresh copy of the grid from a diffusers FlowMatchEulerDiscreteScheduler."""
        fresh = type(scheduler).from_config(scheduler.config)  # set_timesteps() mutates .sigmas
        return cls(fresh.sigmas.float().clone(), fresh.timesteps.float().clone(), float(fresh.config.shift))

    @property
    def size(self) -> int:
        return self.sigmas.shape[0]

    def index_of_time(self, t: Tensor) -> Tensor:
        """Grid index of an unshifted time t in [0, 1]: clamp(floor((1 - t) N), 0, N - 1)."""
        return ((1.0 - t) * self.size).floor().long().clamp(0, self.size - 1)

    def index_of_sigma(self, sigma: Tensor) -> Tensor:
        """Grid index of a continuous sigma, by the reference's rule (SOAR.md step 6).

        j = the first grid index whose sigma is <= ``sigma`` (a searchsorted on the negated, hence
        ascending, grid), then t = 1 - j / N in float32, then snap t as in step 1. The float32 round
        trip sends some points to j - 1; that is the reference's behaviour and the gradient follows
        it. (Undoing the shift analytically would pick another grid point for most points.)
        """
        grid = -self.sigmas.to(sigma.device, torch.float32)
        j = torch.searchsorted(grid, -sigma.to(torch.float32).contiguous(), side="left")
        j = j.clamp(0, self.size - 1)
        t = 1.0 - j.to(torch.float32) / self.size
        return self.index_of_time(t)


@dataclass(frozen=True)
class Rollout:
    """How step 4 gets the velocity the family's sampler follows (SOAR.md, "Families other than SD3").

    ``cfg``: two-pass classifier-free guidance at ``scale`` with the empty prompt (SD3/SD3.5): the
    conditional half is the main pass's output when ``cfg.reuse_main_pass``. ``single``: one pass
    with the prompt; ``velocity`` is the sampler's own callable when it differs from the trained one
    (FLUX.1-dev: embedded guidance 3.5 in the rollout, 1.0 in training), else ``None`` and the main
    pass's output is the rollout velocity (FLUX.1-schnell; dev when both guidances agree).
    """

    mode: str = "cfg"
    scale: float = 4.5
    velocity: Velocity | None = None
    # cfg only: the family's own way to combine (v_cond, v_uncond, scale) where its sampler is not
    # plain CFG (Qwen-Image rescales the guided velocity to the conditional one's norm per token)
    combine: Callable[[Tensor, Tensor, float], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("cfg", "single"):
            raise ValueError(f"unknown rollout mode {self.mode!r}")
        if self.mode == "cfg" and self.velocity is not None:
            raise ValueError("a cfg rollout uses the trained velocity; pass velocity only for mode 'single'")
        if self.mode == "single" and self.combine is not None:
            raise ValueError("combine applies to a cfg rollout only")

    def reuses_main_pass(self, cfg: SoarConfig) -> bool:
        """Whether the main pass's output stands in for a rollout pass (exact: SOAR.md)."""
        return cfg.reuse_main_pass and self.velocity is None

    def describe(self, cfg: SoarConfig) -> str:
        """One line for the run record: which passes the rollout made."""
        if self.mode == "cfg":
            half = "reused main pass" if self.reuses_main_pass(cfg) else "separate pass"
            rescaled = ", rescaled to the conditional norm" if self.combine is not None else ""
            return f"two-pass CFG at {self.scale:g}{rescaled} (conditional half: {half})"
        if self.velocity is not None:
            return "one no-grad pass at the sampler's embedded guidance"
        return "the main pass's output" if self.reuses_main_pass(cfg) else "one separate no-grad pass"


@dataclass
class PathDraws:
    """Randomness of one rollout path: SDE noise for its active samples (None on the ODE path), aux u's."""

    eps: Tensor | None
    u: Tensor  # (K, n_active)


@dataclass
class Draws:
    """Every random draw of one step, so tests can pin them and compare with a plain implementation."""

    z1: Tensor
    t0: Tensor  # (B,)
    drop_cond: bool = False
    paths: list[PathDraws] = field(default_factory=list)
    keep: Tensor | None = None  # with an aux budget: which of the K points this step trains

    @classmethod
    def sample(cls, z0: Tensor, cfg: SoarConfig, grid: NoiseGrid, generator: torch.Generator | None) -> Draws:
        """Draw in the reference's order: cond drop, z1, t0, the ODE path's u, then per SDE path eps, u."""
        device, batch = z0.device, z0.shape[0]
        drop = False
        if cfg.cond_dropout_rate > 0:
            drop = bool(torch.rand((), generator=generator, device=device) < cfg.cond_dropout_rate)
        z1 = torch.randn(z0.shape, generator=generator, device=device, dtype=torch.float32).to(z0.dtype)
        t0 = sample_times(cfg, batch, generator, device)
        draws = cls(z1, t0, drop)
        if cfg.lambda_aux == 0:
            return draws
        k = cfg.trajectory_length
        draws.paths.append(PathDraws(None, torch.rand((k, batch), generator=generator, device=device)))
        active = int(next_times(t0, cfg).gt(0).sum())
        for _ in range(1, cfg.num_rollout_paths if active else 1):
            eps = torch.randn((active, *z0.shape[1:]), generator=generator, device=device)
            draws.paths.append(PathDraws(eps, torch.rand((k, active), generator=generator, device=device)))
        if 0 < cfg.aux_budget < k:
            draws.keep = torch.randperm(k, generator=generator, device=device)[: cfg.aux_budget].sort().values
        return draws

    def to(self, device: torch.device | str) -> Draws:
        """The same draws on ``device`` (they are drawn on the CPU: see ``train.build_run``)."""
        paths = [PathDraws(None if p.eps is None else p.eps.to(device), p.u.to(device)) for p in self.paths]
        keep = None if self.keep is None else self.keep.to(device)
        return Draws(self.z1.to(device), self.t0.to(device), self.drop_cond, paths, keep)

    def select(self, rows: slice, cfg: SoarConfig) -> Draws:
        """This process's share of a global batch's draws: the same randomness whatever the process count."""
        picked = torch.zeros(self.t0.shape[0], dtype=torch.bool, device=self.t0.device)
        picked[rows] = True
        in_active = picked[next_times(self.t0, cfg) > 0]  # which active samples are ours
        paths = [
            PathDraws(None, p.u[:, rows]) if p.eps is None else PathDraws(p.eps[in_active], p.u[:, in_active])
            for p in self.paths
        ]
        return Draws(self.z1[rows], self.t0[rows], self.drop_cond, paths, self.keep)


@dataclass
class LossReport:
    """What one step computed. ``loss`` carries the graph only when no ``backward`` was passed."""

    loss: Tensor
    sum_main: float  # unnormalised sums of the per-sample terms, before lambda and step 7
    sum_aux: float
    n_main: int
    n_aux: int
    grad_forwards: int
    nograd_forwards: int

    @property
    def loss_main(self) -> float:
        """Mean main (flow-matching) term per sample: comparable between SFT and SOAR runs."""
        return self.sum_main / max(self.n_main, 1)

    @property
    def loss_aux(self) -> float:
        """Mean auxiliary (correction) term per auxiliary point."""
        return self.sum_aux / max(self.n_aux, 1)

    @property
    def aux_per_sample(self) -> float:
        return self.n_aux / max(self.n_main, 1)


def sample_times(
    cfg: SoarConfig, batch: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """t0 from the timestep density, as diffusers' SD3 helper draws it (cosmap/uniform draw uniformly)."""
    return compute_density_for_timestep_sampling(
        cfg.weighting_scheme, batch, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, device, generator
    ).float()


def next_times(t0: Tensor, cfg: SoarConfig) -> Tensor:
    """t1 = max(t0 - 1/num_sampling_steps, 0): one sampler step towards the data."""
    return (t0 - 1.0 / cfg.num_sampling_steps).clamp_min(0.0)


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _weighted_sq_error(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """sum over samples of mean over pixels of w (pred - target)^2, in fp32."""
    err = (pred.float() - target.float()) ** 2 * _bcast(weight.float(), pred.float())
    return err.reshape(err.shape[0], -1).mean(dim=1).sum()


def _index(cond: Cond, idx: Tensor | None) -> Cond:
    return cond if idx is None else {key: value[idx] for key, value in cond.items()}


def stochastic_step(
    kind: str, zs0: Tensor, v: Tensor, s0: Tensor, s1: Tensor, eps: Tensor, eta: float, sigma_1: float
) -> Tensor:
    """One stochastic sampler step (SOAR.md step 5), computed in fp32. ``sigma_1`` = grid sigmas[1]."""
    zs0, v, eps = zs0.float(), v.float(), eps.float()
    s0, s1 = _bcast(s0.float(), zs0), _bcast(s1.float(), zs0)
    dt = s1 - s0
    x0_hat = zs0 - s0 * v
    if kind == "simple":
        return zs0 + v * dt + eta * dt.abs().sqrt() * eps
    if kind == "sde":
        return (1 - s1) * x0_hat + s1 * eps
    if kind == "flow_sde":
        s0_safe = torch.where(s0 == 1, torch.full_like(s0, sigma_1), s0)
        std = eta * (s0 / (1 - s0_safe)).sqrt()
        return (
            zs0 * (1 + std**2 * dt / (2 * s0))
            + v * (1 + std**2 * (1 - s0) / (2 * s0)) * dt
            + std * (-dt).clamp_min(0).sqrt() * eps
        )
    if kind == "cps":
        std = s1 * math.sin(eta * math.pi / 2)
        n_hat = zs0 + (1 - s0) * v
        return (1 - s1) * x0_hat + (s1**2 - std**2).clamp_min(0).sqrt() * n_hat + std * eps
    raise ValueError(f"unknown sde_rollout_type {kind!r}")


def count_terms(t0: Tensor, cfg: SoarConfig) -> tuple[int, int]:
    """(n_main, n_aux) of one step, known before any forward: B and K (B + (M-1) n_active)."""
    batch = t0.shape[0]
    if cfg.lambda_aux == 0:
        return batch, 0
    active = int(next_times(t0, cfg).gt(0).sum())
    paths_active = (cfg.num_rollout_paths - 1) * active if active else 0
    return batch, cfg.trajectory_length * (batch + paths_active)


def soar_loss(
    velocity: Velocity,
    z0: Tensor,
    cond: Cond,
    uncond: Cond | None,
    grid: NoiseGrid,
    cfg: SoarConfig,
    *,
    rollout: Rollout | None = None,
    draws: Draws | None = None,
    generator: torch.Generator | None = None,
    backward: Backward | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    world_size: int = 1,
) -> LossReport:
    """One SOAR step (SFT when ``cfg.lambda_aux == 0``). See the module docstring for ``backward``.

    ``rollout`` says how step 4 imitates the sampler (default: two-pass CFG at
    ``cfg.cfg_scale_sampling``, which needs ``uncond``); ``uncond`` may be None for a single-pass
    rollout without conditional dropout.
    ``reduce_sum`` sums the two term counts over processes (one all-reduce, before any forward);
    the loss is multiplied by ``world_size`` to undo DDP's gradient averaging, as the reference does.
    """
    rollout = rollout or Rollout("cfg", cfg.cfg_scale_sampling)
    draws = draws or Draws.sample(z0, cfg, grid, generator)
    if uncond is None and (draws.drop_cond or (rollout.mode == "cfg" and cfg.lambda_aux > 0)):
        raise ValueError("this step needs the empty-prompt embedding (uncond): CFG rollout or cond dropout")
    if draws.drop_cond:
        cond = uncond
    n_main, n_aux = count_terms(draws.t0, cfg)
    drawn = sum(path.u.shape[0] * path.u.shape[1] for path in draws.paths) if cfg.lambda_aux else 0
    if drawn != n_aux:
        raise ValueError(f"draws hold {drawn} auxiliary points but cfg implies {n_aux} (K, M or t0 disagree)")
    counts = torch.tensor([float(n_main), float(n_aux)], device=z0.device)
    if reduce_sum is not None:
        counts = reduce_sum(counts)
    scale = world_size / max(float(counts[0]) + cfg.lambda_aux * float(counts[1]), 1.0)
    sigmas, timesteps = grid.sigmas.to(z0.device), grid.timesteps.to(z0.device)
    terms: list[Tensor] = []
    last = n_aux == 0

    def emit(term: Tensor, is_last: bool) -> None:
        if backward is not None:
            backward(term * scale, is_last)
        else:
            terms.append(term * scale)

    # Steps 1-3: the main flow-matching term on the ideal noised state.
    idx0 = grid.index_of_time(draws.t0.to(z0.device))
    s0 = sigmas[idx0]
    zs0 = (1 - _bcast(s0, z0)) * z0 + _bcast(s0, z0) * draws.z1
    v_main = velocity(zs0, timesteps[idx0], cond)
    main = _weighted_sq_error(v_main, draws.z1 - z0, compute_loss_weighting_for_sd3(cfg.weighting_scheme, s0))
    report = LossReport(torch.zeros((), device=z0.device), float(main.detach()), 0.0, n_main, n_aux, 1, 0)
    emit(main, last)
    if n_aux:
        v_cond = v_main.detach() if rollout.reuses_main_pass(cfg) else None
        del v_main, main
        v_roll = _rollout(velocity, zs0.detach(), v_cond, cond, uncond, timesteps[idx0], rollout, report)
        _auxiliary_terms(velocity, z0, zs0.detach(), v_roll, cond, draws, idx0, grid, cfg, emit, report)
    report.loss = torch.stack(terms).sum() if terms else report.loss
    if backward is not None:
        report.loss = torch.tensor((report.sum_main + cfg.lambda_aux * report.sum_aux) * scale)
    return report


def _rollout(
    velocity: Velocity,
    zs0: Tensor,
    v_cond: Tensor | None,
    cond: Cond,
    uncond: Cond | None,
    t_model: Tensor,
    rollout: Rollout,
    report: LossReport,
) -> Tensor:
    """Step 4: the sampler's velocity with the current (LoRA-on) weights, no graph, in fp32.

    ``v_cond`` is the main pass's detached output where it may stand in for a pass."""
    with torch.inference_mode():
        if rollout.mode == "single":
            if rollout.velocity is not None:
                v_roll = rollout.velocity(zs0, t_model, cond).float()
                report.nograd_forwards += 1
            elif v_cond is not None:
                v_roll = v_cond.float()
            else:
                v_roll = velocity(zs0, t_model, cond).float()
                report.nograd_forwards += 1
            return v_roll.clone()  # a normal tensor again, usable outside inference mode
        v_uncond = velocity(zs0, t_model, uncond)
        report.nograd_forwards += 1
        if v_cond is None:
            v_cond = velocity(zs0, t_model, cond)
            report.nograd_forwards += 1
        if rollout.combine is not None:
            v_cfg = rollout.combine(v_cond.float(), v_uncond.float(), rollout.scale)
        else:
            v_cfg = v_uncond.float() + rollout.scale * (v_cond.float() - v_uncond.float())
    return v_cfg.clone()


def _auxiliary_terms(
    velocity: Velocity,
    z0: Tensor,
    zs0: Tensor,
    v_cfg: Tensor,
    cond: Cond,
    draws: Draws,
    idx0: Tensor,
    grid: NoiseGrid,
    cfg: SoarConfig,
    emit: Callable[[Tensor, bool], None],
    report: LossReport,
) -> None:
    """Steps 5-6: one sampler step with the rollout velocity ``v_cfg``, K points re-noised along the
    same z1, each corrected back to z0."""
    sigmas, timesteps = grid.sigmas.to(z0.device), grid.timesteps.to(z0.device)
    s0 = sigmas[idx0]
    t1 = next_times(draws.t0.to(z0.device), cfg)
    s1 = sigmas[grid.index_of_time(t1)]
    ode = (zs0.float() + v_cfg * _bcast(s1 - s0, v_cfg)).to(z0.dtype)
    active = torch.nonzero(t1 > 0).flatten()
    starts: list[tuple[Tensor, Tensor | None]] = [(ode, None)]
    for path in draws.paths[1:]:
        z_sde = stochastic_step(
            cfg.sde_rollout_type,
            zs0[active],
            v_cfg[active],
            s0[active],
            s1[active],
            path.eps,
            cfg.sde_noise_scale,
            float(grid.sigmas[1]),
        )
        starts.append((z_sde.to(z0.dtype), active))
    pairs = [(start, path) for start, path in zip(starts, draws.paths, strict=True) if path.u.shape[1] > 0]
    points = draws.keep.tolist() if draws.keep is not None else list(range(cfg.trajectory_length))
    reweight = cfg.trajectory_length / len(points)  # k of K points: unbiased estimate of the K-point sum
    total = len(points) * len(pairs)
    done = 0
    aux_sum = torch.zeros((), device=z0.device)
    for (z1p, idx), path in pairs:
        sub = (lambda x: x) if idx is None else (lambda x, i=idx: x[i])
        s1_p, z1_p, z0_p, c_p = sub(s1), sub(draws.z1), sub(z0), _index(cond, idx)
        for k in points:
            s_aux = s1_p + path.u[k].to(z0.device) * (1 - s1_p)
            a = _bcast((s_aux - s1_p) / (1 - s1_p), z0_p)
            z_aux = (1 - a) * z1p + a * z1_p
            v = velocity(z_aux, timesteps[grid.index_of_sigma(s_aux)], c_p)
            target = (z_aux.float() - z0_p.float()) / _bcast(s_aux.float(), z0_p.float())
            term = _weighted_sq_error(v, target, compute_loss_weighting_for_sd3(cfg.weighting_scheme, s_aux))
            aux_sum = aux_sum + reweight * term.detach().float()  # synced once, at the end
            done += 1
            report.grad_forwards += 1
            emit(cfg.lambda_aux * reweight * term, done == total)
    report.sum_aux = float(aux_sum)
