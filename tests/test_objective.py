"""Tests of the SOAR objective (soar_lite/objective.py) against shared/SOAR.md.

The centrepiece is ``reference_soar``: a plain, per-sample, unoptimised restatement of SOAR.md steps
1-7 that shares no helper with objective.py (its own grid snapping, its own sampler-step formulas,
two separate rollout passes, every graph alive, one backward). With every random draw pinned, its
loss and gradients must equal ``soar_loss``'s. The other tests pin down the exact optimisations
(per-term backward, main-pass reuse), the SFT limit, the random-draw order, the count normaliser,
conditional dropout and the memory invariant of per-term backward.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import Tensor, nn

from soar_lite.config import SoarConfig
from soar_lite.objective import Draws, NoiseGrid, PathDraws, count_terms, soar_loss, stochastic_step

SCHEMES = ("logit_normal", "mode", "cosmap", "uniform")
SDE_TYPES = ("simple", "sde", "flow_sde", "cps")
CHANNELS, HEIGHT, WIDTH = 4, 8, 8
TOKENS, TEXT_DIM, POOLED_DIM = 5, 8, 6
# t0 of the pinned batch: 0.0123 is at the clean boundary (t1 = max(t0 - 1/40, 0) = 0), 0.9996 snaps to
# grid index 0 (s0 = 1, the flow_sde special case), 0.0311 has a tiny positive t1. None of them lies on
# a grid-cell boundary, so floor() is not decided by the last bit.
PINNED_T0 = (0.0123, 0.9996, 0.3, 0.0311, 0.65)
# Tolerances of the comparison with the fp64 reference: observed errors are ~1e-7 (fp32 rounding in
# the implementation); the negative control shows that real deviations are >= 1e-5 (loss) and >= 3e-4
# (gradients, relative to each tensor's largest entry).
LOSS_RTOL, GRAD_RTOL, GRAD_SCALED_ATOL = 2e-6, 1e-5, 1e-6


# ----------------------------------------------------------------------------- fixtures and helpers


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grid() -> NoiseGrid:
    return NoiseGrid.from_scheduler(make_scheduler())


class TinyVelocity(nn.Module):
    """A small deterministic velocity model with the transformer's call contract.

    It depends nonlinearly on the latents (1x1 convs over each pixel and a neighbour, SiLU), on the
    timestep (sinusoidal embedding whose fastest frequency is 1 rad per timestep unit, so a grid
    index off by one changes the output by O(1)), and on both conditioning tensors (mean of
    tanh(prompt_embeds), pooled, through an MLP that modulates the conv features). ``conv_in`` is
    frozen to mimic a frozen base under LoRA.
    """

    def __init__(self, hidden: int = 12, n_freq: int = 6) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, -3, n_freq))
        self.conv_in = nn.Linear(2 * CHANNELS, hidden)  # a 1x1 conv over (pixel, right neighbour)
        self.ctx = nn.Sequential(
            nn.Linear(TEXT_DIM + POOLED_DIM + 2 * n_freq, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden)
        )
        self.conv_out = nn.Linear(2 * hidden, CHANNELS)
        self.conv_in.requires_grad_(False)

    def forward(self, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        assert timesteps.shape == (latents.shape[0],)
        assert cond["prompt_embeds"].shape == (latents.shape[0], TOKENS, TEXT_DIM)
        assert cond["pooled_prompt_embeds"].shape == (latents.shape[0], POOLED_DIM)
        dtype = latents.dtype
        phase = timesteps.to(dtype)[:, None] * self.freqs.to(dtype)
        ctx = torch.cat(
            [
                torch.tanh(cond["prompt_embeds"].to(dtype)).mean(1),
                cond["pooled_prompt_embeds"].to(dtype),
                phase.sin(),
                phase.cos(),
            ],
            dim=-1,
        )
        scale, shift = self.ctx(ctx).chunk(2, dim=-1)
        x = latents.permute(0, 2, 3, 1)  # (B, H, W, C); torch's CPU conv2d is slow at this size
        h = F.silu(self.conv_in(torch.cat([x, x.roll(1, dims=2)], dim=-1)))
        h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
        h = F.silu(h)
        return 4.0 * self.conv_out(torch.cat([h, h.roll(1, dims=1)], dim=-1)).permute(0, 3, 1, 2)


def make_model(dtype: torch.dtype, seed: int = 0) -> TinyVelocity:
    torch.manual_seed(seed)
    return TinyVelocity().to(dtype)


def make_batch(batch: int, dtype: torch.dtype, seed: int = 1) -> tuple[Tensor, dict, dict]:
    """z0, cond, uncond (the empty prompt, the same row for every sample, as a cached embedding is)."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn((batch, CHANNELS, HEIGHT, WIDTH), generator=g).to(dtype)
    cond = {
        "prompt_embeds": torch.randn((batch, TOKENS, TEXT_DIM), generator=g).to(dtype),
        "pooled_prompt_embeds": torch.randn((batch, POOLED_DIM), generator=g).to(dtype),
    }
    empty_text = torch.randn((1, TOKENS, TEXT_DIM), generator=g).to(dtype)
    empty_pooled = torch.randn((1, POOLED_DIM), generator=g).to(dtype)
    uncond = {
        "prompt_embeds": empty_text.expand(batch, -1, -1).clone(),
        "pooled_prompt_embeds": empty_pooled.expand(batch, -1).clone(),
    }
    return z0, cond, uncond


def active_mask(t0: Tensor, num_sampling_steps: int) -> list[bool]:
    """t1 > 0, written out per sample."""
    return [max(float(t) - 1.0 / num_sampling_steps, 0.0) > 0 for t in t0]


def pinned_draws(
    cfg: SoarConfig, dtype: torch.dtype, t0: tuple[float, ...] = PINNED_T0, seed: int = 2
) -> Draws:
    """Hand-built draws. Values are drawn in fp32 and cast, so the implementation's fp32 casts are exact."""
    g = torch.Generator().manual_seed(seed)
    batch, k = len(t0), cfg.trajectory_length
    t0_t = torch.tensor(t0, dtype=torch.float64)
    draws = Draws(torch.randn((batch, CHANNELS, HEIGHT, WIDTH), generator=g).to(dtype), t0_t)
    if cfg.lambda_aux == 0:
        return draws
    draws.paths.append(PathDraws(None, torch.rand((k, batch), generator=g).to(torch.float64)))
    n_active = sum(active_mask(t0_t, cfg.num_sampling_steps))
    for _ in range(1, cfg.num_rollout_paths if n_active else 1):  # no empty paths, as Draws.sample
        eps = torch.randn((n_active, CHANNELS, HEIGHT, WIDTH), generator=g).to(dtype)
        draws.paths.append(PathDraws(eps, torch.rand((k, n_active), generator=g).to(torch.float64)))
    return draws


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def grads_close(
    actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float, scaled_atol: float
) -> bool:
    """Element-wise |a - e| <= atol + rtol |e|, with atol = scaled_atol * max|e| of each tensor."""
    assert actual.keys() == expected.keys()
    return all(
        torch.allclose(
            actual[name], expected[name], rtol=rtol, atol=scaled_atol * float(expected[name].abs().max())
        )
        for name in expected
    )


def assert_grads_close(
    actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float, scaled_atol: float
) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        atol = scaled_atol * float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def assert_grads_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


class Recorder:
    """Wraps a velocity callable and records every call: grad mode, batch size, the cond it got."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[dict] = []

    def __call__(self, latents: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        self.calls.append(
            {
                "grad": torch.is_grad_enabled(),
                "batch": latents.shape[0],
                "cond": {key: value.detach().clone() for key, value in cond.items()},
            }
        )
        return self.model(latents, timesteps, cond)

    @property
    def grad_calls(self) -> int:
        return sum(call["grad"] for call in self.calls)

    @property
    def nograd_calls(self) -> int:
        return sum(not call["grad"] for call in self.calls)


def run_soar(
    model: nn.Module,
    z0: Tensor,
    cond: dict,
    uncond: dict,
    grid: NoiseGrid,
    cfg: SoarConfig,
    per_term: bool,
    **kwargs,
) -> tuple[Tensor, dict[str, Tensor], object]:
    """soar_loss, then its gradients (joint: one loss.backward(); per-term: backward callback)."""
    module = model.model if isinstance(model, Recorder) else model
    zero_grads(module)
    if per_term:
        report = soar_loss(
            model, z0, cond, uncond, grid, cfg, backward=lambda term, last: term.backward(), **kwargs
        )
    else:
        report = soar_loss(model, z0, cond, uncond, grid, cfg, **kwargs)
        report.loss.backward()
    return report.loss.detach(), grads_of(module), report


# ----------------------------------------------------------------------------- the plain reference


def spec_snap_sigma(sigmas: list[float], s: float) -> int:
    """SOAR.md step 6's grid index for a continuous s', in the page's words, written without torch.

    j = the first index of the descending grid whose sigma is <= s', clamped to [0, N-1]; t' = 1 - j/N
    as float32; then t' snaps as in step 1, with a float32 tensor's arithmetic.
    """
    n_grid = len(sigmas)
    j = next((i for i, sigma in enumerate(sigmas) if sigma <= s), n_grid)
    j = min(max(j, 0), n_grid - 1)
    n32 = np.float32(n_grid)
    t32 = np.float32(1.0) - np.float32(j) / n32
    return min(max(math.floor(float((np.float32(1.0) - t32) * n32)), 0), n_grid - 1)


def reference_soar(
    model: nn.Module,
    z0: Tensor,
    cond: dict,
    uncond: dict,
    cfg: SoarConfig,
    draws: Draws,
    world_size: int = 1,
    snap_sigma_by: str = "reference",
    continuous_target: bool = True,
) -> Tensor:
    """SOAR.md steps 1-7, sample by sample, in float64, sharing nothing with objective.py.

    Returns one joint loss whose graph holds the main term and every auxiliary term. The rollout runs
    the conditional and the unconditional pass separately, without gradient. ``snap_sigma_by`` and
    ``continuous_target`` exist only for the negative-control test (deliberately wrong variants).
    """
    scheduler = make_scheduler()
    sigmas = [float(s) for s in scheduler.sigmas]  # fp32 grid values, exactly, as python floats
    timesteps = [float(t) for t in scheduler.timesteps]
    n_grid, shift = len(sigmas), float(scheduler.config.shift)
    batch, lam, k_points, g_cfg = z0.shape[0], cfg.lambda_aux, cfg.trajectory_length, cfg.cfg_scale_sampling
    eta = cfg.sde_noise_scale
    if draws.drop_cond:
        cond = uncond

    def snap_time(t: float) -> int:
        return min(max(math.floor((1.0 - t) * n_grid), 0), n_grid - 1)

    def snap_sigma(s: float) -> int:
        if snap_sigma_by == "analytic":  # negative control: undo s = shift t / (1 + (shift - 1) t), floor
            return snap_time(s / (shift - (shift - 1.0) * s))
        return spec_snap_sigma(sigmas, s)

    def weight(s: float) -> float:
        sigma = torch.tensor([s], dtype=torch.float64)
        return float(compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigma))

    def f(z: Tensor, timestep: float, c: dict, b: int) -> Tensor:
        out = model(
            z[None].double(),
            torch.tensor([timestep], dtype=torch.float64),
            {
                "prompt_embeds": c["prompt_embeds"][b : b + 1].double(),
                "pooled_prompt_embeds": c["pooled_prompt_embeds"][b : b + 1].double(),
            },
        )
        return out[0]

    z0, z1 = z0.double(), draws.z1.double()
    t0 = [float(t) for t in draws.t0]
    loss_main = torch.zeros((), dtype=torch.float64)
    loss_aux = torch.zeros((), dtype=torch.float64)
    n_main, n_aux = batch, 0

    # Steps 1-3.
    s0, zs0 = [], []
    for b in range(batch):
        i0 = snap_time(t0[b])
        s0.append(sigmas[i0])
        zs0.append((1.0 - s0[b]) * z0[b] + s0[b] * z1[b])
        v = f(zs0[b], timesteps[i0], cond, b)
        loss_main = loss_main + (weight(s0[b]) * (v - (z1[b] - z0[b])) ** 2).mean()

    if lam > 0:
        # Step 4: the CFG rollout velocity, two passes, no gradient.
        v_cfg = []
        with torch.no_grad():
            for b in range(batch):
                i0 = snap_time(t0[b])
                v_c = f(zs0[b], timesteps[i0], cond, b)
                v_u = f(zs0[b], timesteps[i0], uncond, b)
                v_cfg.append(v_u + g_cfg * (v_c - v_u))
        # Step 5: one sampler step; path 0 is the ODE step for every sample.
        t1 = [max(t - 1.0 / cfg.num_sampling_steps, 0.0) for t in t0]
        s1 = [sigmas[snap_time(t)] for t in t1]
        paths = [[(b, zs0[b] + v_cfg[b] * (s1[b] - s0[b])) for b in range(batch)]]
        active = [b for b in range(batch) if t1[b] > 0]
        for path in draws.paths[1:]:
            starts = []
            for j, b in enumerate(active):
                eps = path.eps[j].double()
                dt = s1[b] - s0[b]
                x0_hat = zs0[b] - s0[b] * v_cfg[b]
                if cfg.sde_rollout_type == "simple":
                    z_next = zs0[b] + v_cfg[b] * dt + eta * math.sqrt(abs(dt)) * eps
                elif cfg.sde_rollout_type == "sde":
                    z_next = (1.0 - s1[b]) * x0_hat + s1[b] * eps
                elif cfg.sde_rollout_type == "flow_sde":
                    s0_prime = sigmas[1] if s0[b] == 1.0 else s0[b]
                    std = eta * math.sqrt(s0[b] / (1.0 - s0_prime))
                    z_next = (
                        zs0[b] * (1.0 + std**2 * dt / (2.0 * s0[b]))
                        + v_cfg[b] * (1.0 + std**2 * (1.0 - s0[b]) / (2.0 * s0[b])) * dt
                        + std * math.sqrt(max(-dt, 0.0)) * eps
                    )
                else:  # cps
                    std = s1[b] * math.sin(eta * math.pi / 2.0)
                    n_hat = zs0[b] + (1.0 - s0[b]) * v_cfg[b]
                    z_next = (
                        (1.0 - s1[b]) * x0_hat + math.sqrt(max(s1[b] ** 2 - std**2, 0.0)) * n_hat + std * eps
                    )
                starts.append((b, z_next))
            paths.append(starts)
        # Step 6: K re-noised points per path and sample, corrected back to z0.
        for starts, path in zip(paths, draws.paths, strict=True):
            for k in range(k_points):
                for j, (b, z_start) in enumerate(starts):
                    u = float(path.u[k, j])
                    s_aux = s1[b] + u * (1.0 - s1[b])
                    a = (s_aux - s1[b]) / (1.0 - s1[b])
                    z_aux = (1.0 - a) * z_start + a * z1[b]
                    i_aux = snap_sigma(s_aux)
                    s_target = s_aux if continuous_target else sigmas[i_aux]
                    v_corr = (z_aux - z0[b]) / s_target
                    v = f(z_aux, timesteps[i_aux], cond, b)
                    loss_aux = loss_aux + (weight(s_aux) * (v - v_corr) ** 2).mean()
                    n_aux += 1
    # Step 7.
    return (loss_main + lam * loss_aux) / max(n_main + lam * n_aux, 1) * world_size


ROLLOUTS = [("ode", 1), *[(kind, 3) for kind in SDE_TYPES]]


# ----------------------------------------------------------------------------- 1. against the reference


@pytest.mark.parametrize("per_term", [False, True], ids=["joint", "per_term"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("rollout", "paths"), ROLLOUTS, ids=[r for r, _ in ROLLOUTS])
def test_matches_plain_reference(
    grid: NoiseGrid, rollout: str, paths: int, scheme: str, per_term: bool
) -> None:
    """soar_loss's value and trainable-parameter gradients equal the plain step 1-7 reference.

    Pinned draws include a sample at the clean boundary (t1 = 0, no stochastic path) and one with
    s0 = 1; lambda_aux = 0.7 so that lambda's two roles (term weight and count weight) both show;
    eta = 0.7 (not the default 0.5, where cps's sin(eta pi / 2) would equal cos(eta pi / 2)).
    """
    cfg = SoarConfig(
        lambda_aux=0.7,
        num_rollout_paths=paths,
        weighting_scheme=scheme,
        sde_noise_scale=0.7,
        sde_rollout_type="flow_sde" if rollout == "ode" else rollout,
    )
    model = make_model(torch.float64)
    z0, cond, uncond = make_batch(len(PINNED_T0), torch.float64)
    draws = pinned_draws(cfg, torch.float64)
    assert sum(p.u.numel() for p in draws.paths) == count_terms(draws.t0, cfg)[1]

    zero_grads(model)
    expected = reference_soar(model, z0, cond, uncond, cfg, draws)
    expected.backward()
    expected_grads = grads_of(model)
    assert model.conv_in.weight.grad is None

    loss, grads, _ = run_soar(model, z0, cond, uncond, grid, cfg, per_term, draws=draws)
    # The implementation computes the rollout and the squared errors in fp32 by design (SOAR.md
    # step 5), so agreement is to fp32 precision (observed ~1e-7), not fp64.
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=LOSS_RTOL, atol=0)
    assert_grads_close(grads, expected_grads, rtol=GRAD_RTOL, scaled_atol=GRAD_SCALED_ATOL)
    assert model.conv_in.weight.grad is None


@pytest.mark.parametrize("mutation", ["analytic_snap", "snapped_target", "lambda_1"])
def test_reference_comparison_has_teeth(grid: NoiseGrid, mutation: str) -> None:
    """Negative control: small deliberate deviations from SOAR.md break the comparison above.

    Snapping s' by undoing the shift analytically (soar-lite's rule before SOAR.md step 6 spelled out
    the reference's), using the snapped sigma instead of the
    continuous s' in the target, or a wrong lambda all move the loss far outside the tolerance used.
    """
    cfg = SoarConfig(lambda_aux=0.7, num_rollout_paths=3, sde_rollout_type="cps")
    model = make_model(torch.float64)
    z0, cond, uncond = make_batch(len(PINNED_T0), torch.float64)
    draws = pinned_draws(cfg, torch.float64)
    loss, grads, _ = run_soar(model, z0, cond, uncond, grid, cfg, False, draws=draws)
    zero_grads(model)
    if mutation == "analytic_snap":
        wrong = reference_soar(model, z0, cond, uncond, cfg, draws, snap_sigma_by="analytic")
    elif mutation == "snapped_target":
        wrong = reference_soar(model, z0, cond, uncond, cfg, draws, continuous_target=False)
    else:
        wrong = reference_soar(model, z0, cond, uncond, dataclasses.replace(cfg, lambda_aux=1.0), draws)
    wrong.backward()
    assert not torch.allclose(loss.double(), wrong.detach(), rtol=LOSS_RTOL, atol=0)
    assert not grads_close(grads, grads_of(model), rtol=GRAD_RTOL, scaled_atol=GRAD_SCALED_ATOL)


def test_aux_grid_index_follows_step_6(grid: NoiseGrid) -> None:
    """index_of_sigma picks SOAR.md step 6's grid point for every s', edges included.

    The same draws also show why the rule matters: undoing the shift analytically and flooring (the
    rule before step 6 spelled out the reference's) picks another point for most s'.
    """
    sigmas = [float(v) for v in make_scheduler().sigmas]
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor([1.0, 0.0, 1e-7, sigmas[0], sigmas[-1], *sigmas[::97]])  # ends, exact grid values
    s_aux = torch.cat([torch.rand(4000, generator=gen), edges])
    got = grid.index_of_sigma(s_aux).tolist()
    expected = [spec_snap_sigma(sigmas, float(s)) for s in s_aux]
    assert got == expected
    j_direct = [
        min(next((i for i, v in enumerate(sigmas) if v <= float(s)), len(sigmas)), len(sigmas) - 1)
        for s in s_aux[:4000]
    ]
    moved = sum(a != b for a, b in zip(expected[:4000], j_direct, strict=True)) / 4000
    assert 0.02 < moved < 0.2  # the float32 round trip sends some points to j - 1 (SOAR.md: ~8%)
    shift, n_grid = 3.0, len(sigmas)
    analytic = [
        min(max(math.floor((1.0 - float(s) / (shift - (shift - 1.0) * float(s))) * n_grid), 0), n_grid - 1)
        for s in s_aux[:4000]
    ]
    assert sum(a != b for a, b in zip(expected[:4000], analytic, strict=True)) / 4000 > 0.5


@pytest.mark.parametrize("kind", SDE_TYPES)
def test_stochastic_step_formulas(grid: NoiseGrid, kind: str) -> None:
    """stochastic_step equals SOAR.md step 5's formulas, element by element, including s0 = 1."""
    g = torch.Generator().manual_seed(5)
    s0 = torch.tensor([1.0, 0.7, 0.2, 0.05])
    s1 = torch.tensor([0.98, 0.65, 0.15, 0.01])
    zs0, v, eps = (torch.randn((4, 3, 2, 2), generator=g) for _ in range(3))
    eta, sigma_1 = 0.7, float(grid.sigmas[1])  # not 0.5, where sin(eta pi / 2) = cos(eta pi / 2)
    out = stochastic_step(kind, zs0, v, s0, s1, eps, eta, sigma_1)
    assert out.dtype == torch.float32
    for b in range(4):
        a0, a1 = float(s0[b]), float(s1[b])
        z, vb, e = zs0[b].double(), v[b].double(), eps[b].double()
        dt, x0_hat = a1 - a0, z - a0 * vb
        if kind == "simple":
            want = z + vb * dt + eta * math.sqrt(abs(dt)) * e
        elif kind == "sde":
            want = (1 - a1) * x0_hat + a1 * e
        elif kind == "flow_sde":
            std = eta * math.sqrt(a0 / (1 - (sigma_1 if a0 == 1.0 else a0)))
            want = (
                z * (1 + std**2 * dt / (2 * a0))
                + vb * (1 + std**2 * (1 - a0) / (2 * a0)) * dt
                + std * math.sqrt(max(-dt, 0.0)) * e
            )
        else:
            std = a1 * math.sin(eta * math.pi / 2)
            want = (1 - a1) * x0_hat + math.sqrt(max(a1**2 - std**2, 0.0)) * (z + (1 - a0) * vb) + std * e
        torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 2. lambda = 0 is SFT


@pytest.mark.parametrize("per_term", [False, True], ids=["joint", "per_term"])
@pytest.mark.parametrize("batch", [4, 3, 5])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_lambda_zero_is_sft_bit_for_bit(grid: NoiseGrid, scheme: str, batch: int, per_term: bool) -> None:
    """lambda_aux = 0: loss and grads torch.equal a plain flow-matching loss, with one forward only.

    Plain SFT: sum_b mean_pixels(w(s0) (v - (z1 - z0))^2) / B on zs0 = (1 - s0) z0 + s0 z1, in fp32.
    Bit for bit needs the same float operations: mean_pixels as a mean over the flattened pixels
    (``mean(dim=(1, 2, 3))`` accumulates in another order and differs in the last bit), and the 1/B
    as a multiplication by the reciprocal (step 7's ``world_size / max(count, 1)``); a literal ``/ B``
    is the same bits when B is a power of two and within one ulp otherwise.
    """
    cfg = SoarConfig(lambda_aux=0.0, weighting_scheme=scheme, num_rollout_paths=3)
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(batch, torch.float32)
    draws = pinned_draws(cfg, torch.float32, t0=PINNED_T0[:batch])
    draws.t0 = draws.t0.float()

    zero_grads(model)
    sigmas, timesteps = make_scheduler().sigmas, make_scheduler().timesteps
    idx = ((1 - draws.t0) * len(sigmas)).floor().long().clamp(0, len(sigmas) - 1)
    s0 = sigmas[idx].view(-1, 1, 1, 1)
    zs0 = (1 - s0) * z0 + s0 * draws.z1
    v = model(zs0, timesteps[idx], cond)
    w = compute_loss_weighting_for_sd3(scheme, sigmas[idx]).view(-1, 1, 1, 1)
    per_sample = (w * (v - (draws.z1 - z0)) ** 2).flatten(1).mean(1)
    sft = per_sample.sum() * (1.0 / batch)
    sft.backward()
    sft_grads = grads_of(model)

    recorder = Recorder(model)
    loss, grads, report = run_soar(recorder, z0, cond, uncond, grid, cfg, per_term, draws=draws)
    assert_grads_equal(grads, sft_grads)
    assert len(recorder.calls) == 1 and recorder.grad_calls == 1
    assert (report.grad_forwards, report.nograd_forwards, report.n_aux) == (1, 0, 0)
    if per_term:  # the reported value is rebuilt from python floats: equal to float64 rounding
        torch.testing.assert_close(loss.double(), sft.detach().double(), rtol=1e-7, atol=0)
        return
    assert torch.equal(loss, sft.detach())
    literal = per_sample.detach().sum() / batch
    if batch & (batch - 1) == 0:
        assert torch.equal(loss, literal)
    else:
        assert (loss - literal).abs() <= torch.finfo(torch.float32).eps * literal.abs()


def test_lambda_zero_draws_nothing_beyond_sft() -> None:
    """With lambda_aux = 0, Draws.sample draws z1 and t0 only: an SFT run's random stream is unchanged."""
    cfg = SoarConfig(lambda_aux=0.0, num_rollout_paths=3)
    z0, _, _ = make_batch(4, torch.float32)
    g = torch.Generator().manual_seed(9)
    draws = Draws.sample(z0, cfg, NoiseGrid.from_scheduler(make_scheduler()), g)
    assert draws.paths == []
    g2 = torch.Generator().manual_seed(9)
    torch.randn(z0.shape, generator=g2)
    torch.normal(0.0, 1.0, size=(4,), generator=g2)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=g2))


# ----------------------------------------------------------------------------- 3. per-term backward


@pytest.mark.parametrize(("lam", "paths", "k"), [(1.0, 1, 6), (0.5, 3, 2), (0.0, 1, 6)])
def test_per_term_backward_equals_joint(grid: NoiseGrid, lam: float, paths: int, k: int) -> None:
    """Per-term backward gives the joint backward's gradients and loss; ``last`` is True once, at the end."""
    cfg = SoarConfig(lambda_aux=lam, num_rollout_paths=paths, trajectory_length=k)
    model = make_model(torch.float64)
    z0, cond, uncond = make_batch(len(PINNED_T0), torch.float64)
    draws = pinned_draws(cfg, torch.float64)

    joint_loss, joint_grads, _ = run_soar(model, z0, cond, uncond, grid, cfg, False, draws=draws)

    flags: list[bool] = []

    def backward(term: Tensor, last: bool) -> None:
        assert term.dim() == 0 and term.requires_grad
        flags.append(last)
        term.backward()

    zero_grads(model)
    report = soar_loss(model, z0, cond, uncond, grid, cfg, draws=draws, backward=backward)
    n_terms = 1 + sum(p.u.shape[0] for p in draws.paths)
    assert len(flags) == n_terms == report.grad_forwards
    assert flags[-1] is True and sum(flags) == 1
    assert not report.loss.requires_grad
    torch.testing.assert_close(report.loss.double(), joint_loss.double(), rtol=1e-6, atol=0)
    assert_grads_close(grads_of(model), joint_grads, rtol=1e-9, scaled_atol=1e-12)


# ----------------------------------------------------------------------------- 4. main-pass reuse


@pytest.mark.parametrize(("paths", "k"), [(1, 6), (3, 2)])
def test_main_pass_reuse_equals_separate_pass(grid: NoiseGrid, paths: int, k: int) -> None:
    """reuse_main_pass True/False: same loss and grads; forwards 1 + 1 + terms vs 1 + 2 + terms."""
    base = SoarConfig(num_rollout_paths=paths, trajectory_length=k, sde_rollout_type="sde")
    model = make_model(torch.float64)
    z0, cond, uncond = make_batch(len(PINNED_T0), torch.float64)
    draws = pinned_draws(base, torch.float64)
    n_aux_forwards = sum(p.u.shape[0] for p in draws.paths)
    assert n_aux_forwards == k * paths

    results = {}
    for reuse in (True, False):
        recorder = Recorder(model)
        cfg = dataclasses.replace(base, reuse_main_pass=reuse)
        loss, grads, report = run_soar(recorder, z0, cond, uncond, grid, cfg, False, draws=draws)
        rollout_passes = 1 if reuse else 2
        assert (report.grad_forwards, report.nograd_forwards) == (1 + n_aux_forwards, rollout_passes)
        assert (recorder.grad_calls, recorder.nograd_calls) == (1 + n_aux_forwards, rollout_passes)
        # Order: main (grad), rollout (no grad), then the aux terms (grad).
        assert [c["grad"] for c in recorder.calls[: 1 + rollout_passes]] == [True] + [False] * rollout_passes
        results[reuse] = (loss, grads)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12, atol=0)
    assert_grads_close(results[True][1], results[False][1], rtol=1e-9, scaled_atol=1e-12)


# ----------------------------------------------------------------------------- 5. random draws


def manual_draws(z0: Tensor, cfg: SoarConfig, seed: int) -> Draws:
    """The draw order SOAR.md states, written out: [cond drop], z1, t0, ODE u (K, B), per path eps, u."""
    g = torch.Generator().manual_seed(seed)
    batch, k = z0.shape[0], cfg.trajectory_length
    drop = False
    if cfg.cond_dropout_rate > 0:
        drop = bool(torch.rand((), generator=g) < cfg.cond_dropout_rate)
    z1 = torch.randn(z0.shape, generator=g)
    if cfg.weighting_scheme == "logit_normal":
        t0 = torch.sigmoid(torch.normal(cfg.logit_mean, cfg.logit_std, size=(batch,), generator=g))
    else:
        u = torch.rand((batch,), generator=g)
        t0 = u
        if cfg.weighting_scheme == "mode":
            t0 = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    draws = Draws(z1, t0, drop)
    draws.paths.append(PathDraws(None, torch.rand((k, batch), generator=g)))
    n_active = sum(active_mask(t0, cfg.num_sampling_steps))
    for _ in range(1, cfg.num_rollout_paths if n_active else 1):
        eps = torch.randn((n_active, *z0.shape[1:]), generator=g)
        draws.paths.append(PathDraws(eps, torch.rand((k, n_active), generator=g)))
    return draws


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"weighting_scheme": "mode", "num_rollout_paths": 3},
        {"weighting_scheme": "cosmap", "num_rollout_paths": 2, "cond_dropout_rate": 0.5},
        {"logit_mean": -3.0, "num_rollout_paths": 3},  # many t0 at the clean boundary: n_active < B
    ],
)
def test_draw_order(grid: NoiseGrid, overrides: dict) -> None:
    """Draws.sample consumes the generator in SOAR.md's order, re-drawn by hand from the same seed."""
    cfg = SoarConfig(trajectory_length=3, **overrides)
    z0, _, _ = make_batch(16, torch.float32)
    got = Draws.sample(z0, cfg, grid, torch.Generator().manual_seed(11))
    want = manual_draws(z0, cfg, 11)
    assert got.drop_cond == want.drop_cond
    assert torch.equal(got.z1, want.z1) and torch.equal(got.t0, want.t0)
    assert len(got.paths) == len(want.paths)
    for p_got, p_want in zip(got.paths, want.paths, strict=True):
        assert (p_got.eps is None) == (p_want.eps is None)
        if p_want.eps is not None:
            assert torch.equal(p_got.eps, p_want.eps)
        assert torch.equal(p_got.u, p_want.u)
    if overrides.get("logit_mean") == -3.0:
        assert 0 < sum(active_mask(want.t0, cfg.num_sampling_steps)) < z0.shape[0]
        assert got.paths[1].u.shape == (3, sum(active_mask(want.t0, cfg.num_sampling_steps)))


def test_generator_reproducible(grid: NoiseGrid) -> None:
    """Same seed: identical loss and grads, equal to Draws.sample's draws; another seed differs."""
    cfg = SoarConfig(num_rollout_paths=2, trajectory_length=2)
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(4, torch.float32)

    def run(seed: int) -> tuple[Tensor, dict]:
        loss, grads, _ = run_soar(
            model, z0, cond, uncond, grid, cfg, False, generator=torch.Generator().manual_seed(seed)
        )
        return loss, grads

    loss_a, grads_a = run(7)
    loss_b, grads_b = run(7)
    assert torch.equal(loss_a, loss_b)
    assert_grads_equal(grads_a, grads_b)
    draws = Draws.sample(z0, cfg, grid, torch.Generator().manual_seed(7))
    loss_c, grads_c, _ = run_soar(model, z0, cond, uncond, grid, cfg, False, draws=draws)
    assert torch.equal(loss_a, loss_c)
    assert_grads_equal(grads_a, grads_c)
    assert not torch.equal(loss_a, run(8)[0])


# ----------------------------------------------------------------------------- 6. count normalisation


@pytest.mark.parametrize(
    ("t0", "lam", "k", "paths", "steps", "expected"),
    [
        ((0.0, 0.01, 0.03, 0.5, 0.99), 1.0, 6, 3, 40, (5, 6 * (5 + 2 * 3))),
        ((0.0, 0.01, 0.03, 0.5, 0.99), 1.0, 6, 1, 40, (5, 6 * 5)),
        ((0.0, 0.01, 0.03, 0.5, 0.99), 0.0, 6, 3, 40, (5, 0)),
        ((0.0, 0.02), 0.5, 6, 3, 40, (2, 6 * 2)),  # every sample at the clean boundary: ODE path only
        ((0.001, 0.9), 1.0, 2, 4, 40, (2, 2 * (2 + 3 * 1))),
        ((0.05, 0.2), 1.0, 3, 2, 10, (2, 3 * (2 + 1))),  # num_sampling_steps 10: the boundary is 0.1
    ],
)
def test_count_terms(
    grid: NoiseGrid, t0: tuple, lam: float, k: int, paths: int, steps: int, expected: tuple[int, int]
) -> None:
    """count_terms = (B, K (B + (M-1) n_active)), and it is what soar_loss actually supervises."""
    cfg = SoarConfig(lambda_aux=lam, trajectory_length=k, num_rollout_paths=paths, num_sampling_steps=steps)
    assert count_terms(torch.tensor(t0), cfg) == expected
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(len(t0), torch.float32)
    draws = pinned_draws(cfg, torch.float32, t0=t0)
    recorder = Recorder(model)
    report = soar_loss(recorder, z0, cond, uncond, grid, cfg, draws=draws)
    assert (report.n_main, report.n_aux) == expected
    grad_batches = [c["batch"] for c in recorder.calls if c["grad"]]
    assert grad_batches[0] == expected[0] and sum(grad_batches[1:]) == expected[1]
    assert all(b > 0 for b in grad_batches)


def test_reduce_sum_and_world_size(grid: NoiseGrid) -> None:
    """Counts summed over processes and the world_size factor: L = local sum * W / global count.

    Doubling the counts with world_size 2 is the single-process loss exactly; other processes'
    counts divide the local sum by the global count.
    """
    cfg = SoarConfig(lambda_aux=0.5, num_rollout_paths=3, trajectory_length=2)
    model = make_model(torch.float64)
    z0, cond, uncond = make_batch(len(PINNED_T0), torch.float64)
    draws = pinned_draws(cfg, torch.float64)
    n_main, n_aux = count_terms(draws.t0, cfg)
    assert n_main == 5 and n_aux == 2 * (5 + 2 * 4)  # one sample at the clean boundary

    single, single_grads, report = run_soar(model, z0, cond, uncond, grid, cfg, False, draws=draws)
    doubled, doubled_grads, _ = run_soar(
        model,
        z0,
        cond,
        uncond,
        grid,
        cfg,
        False,
        draws=draws,
        reduce_sum=lambda counts: counts * 2,
        world_size=2,
    )
    assert torch.equal(single, doubled)
    assert_grads_equal(single_grads, doubled_grads)

    other = torch.tensor([3.0, 20.0])
    uneven, _, _ = run_soar(
        model,
        z0,
        cond,
        uncond,
        grid,
        cfg,
        False,
        draws=draws,
        reduce_sum=lambda counts: counts + other,
        world_size=2,
    )
    local_sum = report.sum_main + cfg.lambda_aux * report.sum_aux
    expected = local_sum * 2 / (n_main + 3 + cfg.lambda_aux * (n_aux + 20))
    torch.testing.assert_close(float(uneven), expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        ref = reference_soar(model, z0, cond, uncond, cfg, draws, world_size=2)
    torch.testing.assert_close(float(doubled), float(ref) / 2, rtol=LOSS_RTOL, atol=0)


def test_sharded_draws_reproduce_the_global_batch(grid: NoiseGrid) -> None:
    """Two simulated processes: Draws.select shards, counts summed by reduce_sum, world_size 2.

    The shard losses summed, and the shard gradients averaged (what DDP does), equal the loss and
    gradients of the whole batch in one process: the count normaliser is global, not per shard.
    """
    cfg = SoarConfig(lambda_aux=0.7, num_rollout_paths=3, trajectory_length=2, sde_noise_scale=0.7)
    t0 = (*PINNED_T0, 0.02)  # two samples at the clean boundary, one in each shard
    model = make_model(torch.float64)
    z0, cond, uncond = make_batch(len(t0), torch.float64)
    draws = pinned_draws(cfg, torch.float64, t0=t0)
    full_loss, full_grads, _ = run_soar(model, z0, cond, uncond, grid, cfg, False, draws=draws)

    shards = [slice(0, 3), slice(3, 6)]
    parts = [draws.select(rows, cfg) for rows in shards]
    local = [torch.tensor(count_terms(part.t0, cfg), dtype=torch.float64) for part in parts]
    total = local[0] + local[1]
    assert tuple(total.tolist()) == count_terms(draws.t0, cfg)
    loss_sum = torch.zeros((), dtype=torch.float64)
    grad_sum = {name: torch.zeros_like(g) for name, g in full_grads.items()}
    for rows, part in zip(shards, parts, strict=True):
        sub = lambda c, r=rows: {key: value[r] for key, value in c.items()}  # noqa: E731
        loss, grads, _ = run_soar(
            model,
            z0[rows],
            sub(cond),
            sub(uncond),
            grid,
            cfg,
            True,
            draws=part,
            reduce_sum=lambda counts: total.to(counts),
            world_size=2,
        )
        loss_sum += loss.double()
        for name in grad_sum:
            grad_sum[name] += grads[name]
    torch.testing.assert_close(loss_sum / 2, full_loss.double(), rtol=1e-6, atol=0)
    assert_grads_close({n: g / 2 for n, g in grad_sum.items()}, full_grads, rtol=1e-6, scaled_atol=1e-8)


# ----------------------------------------------------------------------------- 7. conditional dropout


def test_cond_dropout_uses_uncond_everywhere(grid: NoiseGrid) -> None:
    """cond_dropout_rate = 1: every forward (main, rollout, aux, SDE-path subsets) gets the empty prompt."""
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(len(PINNED_T0), torch.float32)
    empty = {key: value[0] for key, value in uncond.items()}

    def is_empty(call: dict) -> bool:
        return all(torch.equal(call["cond"][key], empty[key].expand_as(call["cond"][key])) for key in empty)

    for reuse in (True, False):
        cfg = SoarConfig(
            cond_dropout_rate=1.0, num_rollout_paths=3, trajectory_length=2, reuse_main_pass=reuse
        )
        recorder = Recorder(model)
        dropped = soar_loss(recorder, z0, cond, uncond, grid, cfg, generator=torch.Generator().manual_seed(3))
        assert len(recorder.calls) == dropped.grad_forwards + dropped.nograd_forwards
        assert all(is_empty(call) for call in recorder.calls)
        # The same step with the captions replaced by hand is the same loss.
        draws = Draws.sample(z0, cfg, grid, torch.Generator().manual_seed(3))
        assert draws.drop_cond
        draws.drop_cond = False
        by_hand = soar_loss(model, z0, uncond, uncond, grid, cfg, draws=draws)
        assert torch.equal(dropped.loss, by_hand.loss)

    cfg = SoarConfig(cond_dropout_rate=0.0, num_rollout_paths=3, trajectory_length=2)
    recorder = Recorder(model)
    soar_loss(recorder, z0, cond, uncond, grid, cfg, generator=torch.Generator().manual_seed(3))
    assert not is_empty(recorder.calls[0]) and is_empty(recorder.calls[1])  # main: captions; rollout: empty


# ----------------------------------------------------------------------------- 8. memory invariant


class SavedTensorMeter:
    """Bytes of tensors saved for backward that are alive, and their peak, via saved_tensors_hooks."""

    def __init__(self) -> None:
        self.alive = 0
        self.peak = 0

    def pack(self, tensor: Tensor) -> _Held:
        nbytes = tensor.numel() * tensor.element_size()
        self.alive += nbytes
        self.peak = max(self.peak, self.alive)
        return _Held(tensor, nbytes, self)

    @staticmethod
    def unpack(held: _Held) -> Tensor:
        return held.tensor


class _Held:
    """A saved tensor; the meter's count drops when autograd frees it (the graph is released)."""

    def __init__(self, tensor: Tensor, nbytes: int, meter: SavedTensorMeter) -> None:
        self.tensor, self.nbytes, self.meter = tensor, nbytes, meter

    def __del__(self) -> None:
        self.meter.alive -= self.nbytes


def saved_peak(
    grid: NoiseGrid, k: int, per_term: bool, lambda_aux: float = 1.0, paths: int = 1
) -> tuple[int, int]:
    """(peak, alive afterwards) of saved-tensor bytes over one full step (forwards and backward)."""
    cfg = SoarConfig(trajectory_length=k, lambda_aux=lambda_aux, num_rollout_paths=paths)
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(4, torch.float32)
    draws = pinned_draws(cfg, torch.float32, t0=(0.2, 0.4, 0.6, 0.8))
    meter = SavedTensorMeter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        if per_term:
            soar_loss(model, z0, cond, uncond, grid, cfg, draws=draws, backward=lambda t, last: t.backward())
        else:
            report = soar_loss(model, z0, cond, uncond, grid, cfg, draws=draws)
            report.loss.backward()
            del report
    return meter.peak, meter.alive


def test_per_term_backward_keeps_one_graph_alive(grid: NoiseGrid) -> None:
    """Per-term backward: peak saved activations at K = 6 (and M = 3) equal one forward's.

    That is the K = 1 peak and the SFT (lambda 0) peak. The joint backward keeps all 1 + K graphs
    alive, so its peak grows (1 + K)-fold; every saved tensor is freed by the end of the step in
    both modes (nothing leaks into the next step).
    """
    sft, alive_sft = saved_peak(grid, 6, per_term=True, lambda_aux=0.0)
    per_term_1, alive_a = saved_peak(grid, 1, per_term=True)
    per_term_6, alive_b = saved_peak(grid, 6, per_term=True)
    per_term_6_m3, alive_c = saved_peak(grid, 6, per_term=True, paths=3)
    joint_1, alive_d = saved_peak(grid, 1, per_term=False)
    joint_6, alive_e = saved_peak(grid, 6, per_term=False)
    assert alive_sft == alive_a == alive_b == alive_c == alive_d == alive_e == 0
    assert sft > 0
    assert per_term_1 <= 1.05 * sft and per_term_6 <= 1.05 * sft and per_term_6_m3 <= 1.05 * sft
    assert joint_1 >= 1.8 * per_term_1
    assert joint_6 >= 6 * per_term_6


# ---------------------------------------------------------------- auxiliary-point budget (k of K)


def _budget_grads(keep: list[int] | None, k_total: int = 3) -> tuple[float, list[torch.Tensor], int]:
    """Loss, LoRA-like grads and velocity calls of one step with the aux points restricted to ``keep``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from soar_lite.config import SoarConfig
    from soar_lite.objective import Draws, NoiseGrid, soar_loss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    calls = []

    def velocity(z, t, c):
        calls.append(1)
        h = (
            z.permute(0, 2, 3, 1)
            + c["pooled_prompt_embeds"][:, None, None, :4]
            + t[:, None, None, None] / 1000
        )
        return net(h).permute(0, 3, 1, 2)

    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(3, 4, 2, 2, generator=g)
    cond = {
        "prompt_embeds": torch.randn(3, 2, 4, generator=g),
        "pooled_prompt_embeds": torch.randn(3, 4, generator=g),
    }
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    cfg = SoarConfig(trajectory_length=k_total, aux_budget=len(keep) if keep else 0)
    grid = NoiseGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    draws = Draws.sample(z0, SoarConfig(trajectory_length=k_total), grid, torch.Generator().manual_seed(5))
    draws.keep = torch.tensor(keep) if keep is not None else None
    report = soar_loss(velocity, z0, cond, uncond, grid, cfg, draws=draws)
    report.loss.backward()
    return float(report.loss.detach()), [p.grad.clone() for p in net.parameters()], len(calls)


def test_aux_budget_is_an_unbiased_estimate_of_the_full_k_step():
    """Averaged over every 1-of-3 choice, the reweighted loss and gradient equal the full K=3 step."""
    full_loss, full_grads, full_calls = _budget_grads(None)
    runs = [_budget_grads([i]) for i in range(3)]
    assert full_calls == 1 + 1 + 3 and all(calls == 1 + 1 + 1 for _, _, calls in runs)
    assert abs(sum(loss for loss, _, _ in runs) / 3 - full_loss) < 1e-6
    for i, full in enumerate(full_grads):
        torch.testing.assert_close(sum(grads[i] for _, grads, _ in runs) / 3, full, rtol=1e-5, atol=1e-7)


def test_aux_budget_draw_comes_last_and_keeps_sorted_distinct_points():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from soar_lite.config import SoarConfig
    from soar_lite.objective import Draws, NoiseGrid

    grid = NoiseGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    z0 = torch.zeros(2, 4, 2, 2)
    plain = Draws.sample(z0, SoarConfig(), grid, torch.Generator().manual_seed(1))
    budget = Draws.sample(z0, SoarConfig(aux_budget=2), grid, torch.Generator().manual_seed(1))
    assert torch.equal(plain.z1, budget.z1) and torch.equal(plain.paths[0].u, budget.paths[0].u)
    assert plain.keep is None and budget.keep.tolist() == sorted(set(budget.keep.tolist()))
    assert len(budget.keep) == 2
