"""Exposure-bias objectives other than SOAR, as pure functions of tensors in objective.py's style.

Why a module of its own: ``objective.py`` is SOAR as shared/SOAR.md states it, tested bit for bit;
an alternative must not be able to change it. This module imports helpers from there, never the
other way round. The model comes in as a ``velocity(latents, timesteps, cond)`` callable, every
random draw as a pinned draws object (or from a passed generator, in a stated order), and nothing
here knows about accelerate, processes, files or logging.

Scheduled sampling (``objective=scheduled``), after SimpleTuner's ``helpers/scheduled_sampling``
(read for what it does, not copied): SFT trains only on ideal states ``z_s = (1 - s) z0 + s z1``;
scheduled sampling instead starts the ideal state a few sampler steps *noisier* than the target
level, lets the current model walk those steps itself (no gradient), and trains the plain
flow-matching target ``z1 - z0`` at the target level on the state the model drifted to. Per sample,
with ``t`` the target time drawn as SFT draws it and ``h = 1 / soar.num_sampling_steps`` (one step
of the family's sampler, as SOAR's rollout uses):

1. ``k`` rollout steps: 0 with probability ``1 - scheduled.rollout_probability``, else uniform on
   ``{0, ..., scheduled.rollout_steps}`` (SimpleTuner's "uniform" strategy). ``k = 0`` is SFT.
2. Source time ``t_src = min(t + k h, 1)``; times ``u_j = t_src + (t - t_src) j / k``, j = 0..k,
   with ``u_k = t`` exactly; each snapped to the training grid as SOAR.md step 1 does
   (``sigma_j``, model timestep ``timesteps_j``).
3. ``z_0' = (1 - sigma_0) z0 + sigma_0 z1`` (the same noise ``z1``), then ``k`` Euler steps with
   the family's sampler velocity (:class:`~soar_lite.objective.Rollout`: two-pass CFG, or one pass),
   no graph, in fp32: ``z_{j+1}' = z_j' + v_roll(z_j', sigma_j) (sigma_{j+1} - sigma_j)``.
4. ``L = sum_b w(s) mean_pixels (f(z_k', s, c) - (z1 - z0))^2``, normalised by the batch size
   summed over processes (times the process count), as SFT is.

Differences from SimpleTuner, on purpose: its rollout walks one index of the 1000-point training
grid per model call (a sigma change of about 0.001), which the soar-lite sampler never takes; here a
rollout step is one step of the sampler the LoRA will be used with. Its multistep solvers (UniPC)
are replaced by Euler, the step diffusers' flow-match scheduler takes.

ReflexFlow (``objective=reflexflow``) as SimpleTuner ships it, not as its paper writes it. The paper
(arXiv 2512.04904) names two parts: Anti-Drift Rectification, "a redesigned loss under
training-time scheduled sampling", and Frequency Compensation, "reweighting the loss using exposure
bias". Its equations could not be read through this project's tools (only the abstract and the
project page's opening are stored; the authors' repository is not). What a SimpleTuner user gets,
on by default with scheduled sampling on flow models, is defined by SimpleTuner's
``helpers/models/common.py`` (loss) and ``helpers/scheduled_sampling/rollout.py`` (commit bc8e6ab,
2026-08), read for what it does, not copied, with its documented defaults ``alpha = 1``,
``beta1 = 10`` ("to mirror the paper"), ``beta2 = 1`` (OPTIONS.md, ``--scheduled_sampling_reflexflow*``);
here ``reflexflow.fc_alpha``, ``reflexflow.adr_weight`` and ``reflexflow.fc_weight``.
On scheduled sampling's drifted state ``z'`` (steps 1-3 above; ``z' = z_t`` where ``k = 0``),
with ``v = f(z', t, c)`` the trained prediction and ``u = z1 - z0`` the flow target:

R1. Exposure bias: ``e = f(z_t, t, c) - f(z', t, c)``, both without gradient (the clean
    prediction on the ideal state minus the prediction on the drifted one); ``e = 0`` where ``k = 0``.
R2. Frequency compensation: per element, ``W = 1 + alpha e / max(sum |e|, eps)`` (the sum over the
    sample's elements, so W averages 1 and is signed, as SimpleTuner's), and
    ``L_FC = beta2 w(s) mean_pixels(W (v - u)^2)``.
R3. Anti-drift: ``L_ADR = beta1 || v / |v| - (z' - z0) / |z' - z0| ||^2`` over the flattened sample
    (norms floored at ``eps = 1e-6``): the prediction's direction is pulled towards the direction from
    the clean sample through the drifted state, so an Euler step from ``z'`` heads back to ``z0``.
    It applies to every sample, as SimpleTuner's; on ideal states it is the flow target's direction.

``L = sum_b (L_FC + L_ADR)``, normalised as step 4. One difference from SimpleTuner: its
``f(z', t, c)`` in R1 is an extra no-grad pass on the same input the trained pass sees; here the
trained prediction, detached, is that value (one pass fewer, the same number). The other
differences are scheduled sampling's, above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import Tensor

from soar_lite.config import ReflexFlowConfig, ScheduledConfig, SoarConfig
from soar_lite.objective import (
    Backward,
    Cond,
    Draws,
    LossReport,
    NoiseGrid,
    Rollout,
    Velocity,
    _bcast,
    _index,
    _rollout,
    _weighted_sq_error,
)

EPS = 1e-6  # SimpleTuner's floor under every norm and sum it divides by


@dataclass
class ScheduledDraws:
    """Every random draw of one scheduled-sampling step, so tests can pin them."""

    z1: Tensor
    t0: Tensor  # (B,) target times
    offsets: Tensor  # (B,) int64: rollout steps per sample; 0 = the ideal state (SFT)
    drop_cond: bool = False

    @classmethod
    def sample(
        cls, z0: Tensor, soar: SoarConfig, sched: ScheduledConfig, generator: torch.Generator | None
    ) -> ScheduledDraws:
        """Draw in SFT's order (cond drop, z1, t0), then the offsets, then (probability < 1) the mask.

        With probability 0 or rollout_steps 0 nothing more is drawn: the generator, and so every
        later step, stays exactly SFT's."""
        sft = Draws.sample(z0, replace(soar, lambda_aux=0.0), None, generator)  # type: ignore[arg-type]
        batch, device = z0.shape[0], z0.device
        offsets = torch.zeros(batch, dtype=torch.long, device=device)
        if sched.rollout_probability > 0 and sched.rollout_steps > 0:
            offsets = torch.randint(0, sched.rollout_steps + 1, (batch,), generator=generator, device=device)
            if sched.rollout_probability < 1:
                applied = torch.rand(batch, generator=generator, device=device) < sched.rollout_probability
                offsets = offsets * applied
        return cls(sft.z1, sft.t0, offsets, sft.drop_cond)

    def to(self, device: torch.device | str) -> ScheduledDraws:
        return ScheduledDraws(self.z1.to(device), self.t0.to(device), self.offsets.to(device), self.drop_cond)

    def select(self, rows: slice) -> ScheduledDraws:
        """This process's share of a global batch's draws (the same randomness for any process count)."""
        return ScheduledDraws(self.z1[rows], self.t0[rows], self.offsets[rows], self.drop_cond)


def rollout_times(t0: Tensor, offsets: Tensor, num_sampling_steps: int) -> list[Tensor]:
    """``u_0 .. u_K`` of step 2 (K = max offset), each (B,); a sample with k < K stays at t from u_k on."""
    k = offsets.to(torch.float32)
    t0 = t0.to(torch.float32)
    t_src = (t0 + k / num_sampling_steps).clamp_max(1.0)
    times = []
    for j in range(int(offsets.max()) + 1 if offsets.numel() else 1):
        u = t_src + (t0 - t_src) * (j / k.clamp_min(1.0))
        times.append(torch.where(offsets <= j, t0, u))  # u_k = t exactly, not t_src + (t - t_src)
    return times


def drifted_state(
    velocity: Velocity,
    z0: Tensor,
    draws: ScheduledDraws,
    cond: Cond,
    uncond: Cond | None,
    grid: NoiseGrid,
    soar: SoarConfig,
    rollout: Rollout,
    report: LossReport,
) -> Tensor:
    """Steps 2-3: the state the current model reaches at the target level from ``k`` steps above it.

    Only samples with ``k > 0`` run, each step as one batch of the samples still walking."""
    sigmas, timesteps = grid.sigmas.to(z0.device), grid.timesteps.to(z0.device)
    times = rollout_times(draws.t0.to(z0.device), draws.offsets.to(z0.device), soar.num_sampling_steps)
    s_src = _bcast(sigmas[grid.index_of_time(times[0])], z0).float()
    z = (1 - s_src) * z0.float() + s_src * draws.z1.float()
    for j in range(len(times) - 1):
        walking = torch.nonzero(draws.offsets.to(z0.device) > j).flatten()
        i_now, i_next = grid.index_of_time(times[j][walking]), grid.index_of_time(times[j + 1][walking])
        zj = z[walking].to(z0.dtype)
        c_j = _index(cond, walking)
        u_j = None if uncond is None else _index(uncond, walking)
        v = _rollout(velocity, zj, None, c_j, u_j, timesteps[i_now], rollout, report)
        z[walking] = z[walking] + v * _bcast(sigmas[i_next] - sigmas[i_now], v)
    return z.to(z0.dtype)


@dataclass
class _Drifted:
    """What scheduled sampling and ReflexFlow share: the (possibly drifted) input at the target level."""

    z_in: Tensor
    z_ideal: Tensor
    draws: ScheduledDraws
    cond: Cond
    idx0: Tensor
    s0: Tensor
    scale: float
    walks: bool
    report: LossReport


def _drift(
    velocity: Velocity,
    z0: Tensor,
    cond: Cond,
    uncond: Cond | None,
    grid: NoiseGrid,
    soar: SoarConfig,
    sched: ScheduledConfig,
    rollout: Rollout | None,
    draws: ScheduledDraws | None,
    generator: torch.Generator | None,
    reduce_sum: Callable[[Tensor], Tensor] | None,
    world_size: int,
) -> _Drifted:
    """Steps 1-3 and the normaliser of step 4, for both objectives built on the rollout."""
    rollout = rollout or Rollout("cfg", soar.cfg_scale_sampling)
    draws = draws or ScheduledDraws.sample(z0, soar, sched, generator)
    walks = bool(draws.offsets.gt(0).any())
    if uncond is None and (draws.drop_cond or (rollout.mode == "cfg" and walks)):
        raise ValueError("this step needs the empty-prompt embedding (uncond): CFG rollout or cond dropout")
    if draws.drop_cond:
        cond = uncond
    counts = torch.tensor([float(z0.shape[0]), 0.0], device=z0.device)
    if reduce_sum is not None:
        counts = reduce_sum(counts)
    scale = world_size / max(float(counts[0]), 1.0)  # soar_loss's normaliser with no auxiliary term
    idx0 = grid.index_of_time(draws.t0.to(z0.device))
    s0 = grid.sigmas.to(z0.device)[idx0]
    report = LossReport(torch.zeros((), device=z0.device), 0.0, 0.0, z0.shape[0], 0, 1, 0)
    z_ideal = (1 - _bcast(s0, z0)) * z0 + _bcast(s0, z0) * draws.z1  # soar_loss's expression: SFT bit for bit
    z_in = drifted_state(velocity, z0, draws, cond, uncond, grid, soar, rollout, report) if walks else z_ideal
    return _Drifted(z_in, z_ideal, draws, cond, idx0, s0, scale, walks, report)


def _finish(report: LossReport, terms: Tensor, scale: float, backward: Backward | None) -> LossReport:
    if backward is not None:
        backward(terms * scale, True)
        report.loss = torch.tensor(float(terms.detach()) * scale)
    else:
        report.loss = torch.stack([terms * scale]).sum()
    return report


def scheduled_loss(
    velocity: Velocity,
    z0: Tensor,
    cond: Cond,
    uncond: Cond | None,
    grid: NoiseGrid,
    soar: SoarConfig,
    sched: ScheduledConfig,
    *,
    rollout: Rollout | None = None,
    draws: ScheduledDraws | None = None,
    generator: torch.Generator | None = None,
    backward: Backward | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    world_size: int = 1,
) -> LossReport:
    """One scheduled-sampling step (module docstring); SFT bit for bit where every offset is 0.

    ``soar`` supplies what SFT uses (timestep density, weighting, cond dropout) and the sampler the
    rollout imitates (``num_sampling_steps``; ``rollout`` as for SOAR, default two-pass CFG at
    ``soar.cfg_scale_sampling``). ``backward``, ``reduce_sum`` and ``world_size`` as in ``soar_loss``.
    """
    d = _drift(
        velocity, z0, cond, uncond, grid, soar, sched, rollout, draws, generator, reduce_sum, world_size
    )
    v = velocity(d.z_in, grid.timesteps.to(z0.device)[d.idx0], d.cond)
    main = _weighted_sq_error(v, d.draws.z1 - z0, compute_loss_weighting_for_sd3(soar.weighting_scheme, d.s0))
    d.report.sum_main = float(main.detach())
    return _finish(d.report, main, d.scale, backward)


def reflexflow_loss(
    velocity: Velocity,
    z0: Tensor,
    cond: Cond,
    uncond: Cond | None,
    grid: NoiseGrid,
    soar: SoarConfig,
    sched: ScheduledConfig,
    reflex: ReflexFlowConfig,
    *,
    rollout: Rollout | None = None,
    draws: ScheduledDraws | None = None,
    generator: torch.Generator | None = None,
    backward: Backward | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    world_size: int = 1,
) -> LossReport:
    """One ReflexFlow step as SimpleTuner ships it (module docstring, steps R1-R3).

    The rollout and its draws are scheduled sampling's (the same ``ScheduledDraws``, so the two arms
    see the same drifted states); ``fc_alpha = adr_weight = 0``, ``fc_weight = 1`` is ``scheduled_loss``.
    The report's main term is the frequency-compensated loss, its auxiliary term the anti-drift one
    (one per sample, so ``loss_aux`` is its mean)."""
    d = _drift(
        velocity, z0, cond, uncond, grid, soar, sched, rollout, draws, generator, reduce_sum, world_size
    )
    t_model = grid.timesteps.to(z0.device)[d.idx0]
    v = velocity(d.z_in, t_model, d.cond)
    weight = torch.ones_like(v, dtype=torch.float32)
    if d.walks and reflex.fc_alpha:
        walking = torch.nonzero(d.draws.offsets.to(z0.device) > 0).flatten()
        with torch.no_grad():  # R1: the clean prediction, one pass on the ideal states of rolled samples
            clean = velocity(d.z_ideal[walking], t_model[walking], _index(d.cond, walking))
        d.report.nograd_forwards += 1
        exposure = clean.float() - v[walking].detach().float()
        total = exposure.abs().reshape(exposure.shape[0], -1).sum(dim=1).clamp_min(EPS)
        weight[walking] = 1.0 + reflex.fc_alpha * exposure / _bcast(total, exposure)
    w_s = compute_loss_weighting_for_sd3(soar.weighting_scheme, d.s0)
    err = (v.float() - (d.draws.z1 - z0).float()) ** 2 * weight * _bcast(w_s.float(), weight)
    fc = reflex.fc_weight * err.reshape(err.shape[0], -1).mean(dim=1).sum()  # R2
    flat_v = v.float().reshape(v.shape[0], -1)
    flat_d = (d.z_in.float() - z0.float()).reshape(v.shape[0], -1)
    dir_v = flat_v / flat_v.norm(dim=1, keepdim=True).clamp_min(EPS)
    dir_d = flat_d / flat_d.norm(dim=1, keepdim=True).clamp_min(EPS)
    adr = reflex.adr_weight * ((dir_v - dir_d) ** 2).sum(dim=1).sum()  # R3
    d.report.sum_main, d.report.sum_aux, d.report.n_aux = float(fc.detach()), float(adr.detach()), z0.shape[0]
    return _finish(d.report, fc + adr, d.scale, backward)
