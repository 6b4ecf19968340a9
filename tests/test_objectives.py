"""Tests of scheduled sampling (soar_lite/objectives.py) against its definition in that module's docstring.

``reference_scheduled`` restates steps 1-4 sample by sample in float64, sharing no helper with the
implementation (its own grid snapping, its own CFG, a python loop over Euler steps). With the draws
pinned, value and gradient must agree; a reference that skips the rollout must not (the comparison
has teeth). The limits: probability 0, or every offset 0, is SFT bit for bit, and draws nothing more.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import Tensor, nn

from soar_lite.config import ScheduledConfig, SoarConfig
from soar_lite.objective import Draws, NoiseGrid, Rollout, soar_loss
from soar_lite.objectives import ScheduledDraws, rollout_times, scheduled_loss
from tests.test_objective import (
    Recorder,
    assert_grads_close,
    assert_grads_equal,
    grads_close,
    grads_of,
    make_batch,
    make_model,
    make_scheduler,
    zero_grads,
)

# t0 away from grid-cell boundaries also after adding multiples of 1/STEPS; 0.9612 + k/10 clamps at 1.
PINNED_T0 = (0.3137, 0.9612, 0.0123, 0.5521, 0.7049)
PINNED_K = (2, 3, 0, 1, 3)
STEPS = 10
LOSS_RTOL, GRAD_RTOL, GRAD_SCALED_ATOL = 1e-5, 1e-4, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grid() -> NoiseGrid:
    return NoiseGrid.from_scheduler(make_scheduler())


def pinned(dtype: torch.dtype, offsets: tuple[int, ...] = PINNED_K, seed: int = 2) -> ScheduledDraws:
    g = torch.Generator().manual_seed(seed)
    batch = len(offsets)
    z1 = torch.randn((batch, 4, 8, 8), generator=g).to(dtype)
    t0 = torch.tensor(PINNED_T0[:batch], dtype=torch.float32)
    return ScheduledDraws(z1, t0, torch.tensor(offsets, dtype=torch.long))


def grid_lists() -> tuple[list[float], list[float]]:
    scheduler = make_scheduler()
    return [float(s) for s in scheduler.sigmas], [float(t) for t in scheduler.timesteps]


def snap(t: float, n_grid: int) -> int:
    """SOAR.md step 1's grid snapping, restated."""
    return min(max(math.floor((1.0 - t) * n_grid), 0), n_grid - 1)


def f64(net: nn.Module, z: Tensor, t_model: float, c: dict, b: int) -> Tensor:
    """One sample's prediction in float64."""
    row = {key: value[b : b + 1].double() for key, value in c.items()}
    return net(z[None].double(), torch.tensor([t_model], dtype=torch.float64), row)[0]


def reference_drift(
    model: nn.Module,
    roll_model: nn.Module | None,
    z0: Tensor,
    cond: dict,
    uncond: dict,
    cfg: SoarConfig,
    draws: ScheduledDraws,
    b: int,
    skip_rollout: bool = False,
) -> tuple[Tensor, int]:
    """Steps 1-3 for sample ``b``: the drifted state at the target level and its grid index."""
    sigmas, timesteps = grid_lists()
    n_grid = len(sigmas)
    g = cfg.cfg_scale_sampling
    x0, noise = z0[b].double(), draws.z1[b].double()
    t, k = float(draws.t0[b]), int(draws.offsets[b])
    if skip_rollout:
        k = 0
    t_src = min(t + k / cfg.num_sampling_steps, 1.0)
    s_src = sigmas[snap(t_src, n_grid)]
    z = (1 - s_src) * x0 + s_src * noise
    with torch.no_grad():
        for j in range(k):
            u_now = t_src + (t - t_src) * j / k
            u_next = t if j + 1 == k else t_src + (t - t_src) * (j + 1) / k
            i_now, i_next = snap(u_now, n_grid), snap(u_next, n_grid)
            if roll_model is None:
                v_c = f64(model, z, timesteps[i_now], cond, b)
                v_u = f64(model, z, timesteps[i_now], uncond, b)
                v = v_u + g * (v_c - v_u)
            else:
                v = f64(roll_model, z, timesteps[i_now], cond, b)
            z = z + v * (sigmas[i_next] - sigmas[i_now])
    return z, snap(t, n_grid)


def reference_scheduled(
    model: nn.Module,
    roll_model: nn.Module | None,
    z0: Tensor,
    cond: dict,
    uncond: dict,
    cfg: SoarConfig,
    draws: ScheduledDraws,
    skip_rollout: bool = False,
) -> Tensor:
    """Steps 1-4 of the objectives.py docstring, per sample, in float64.

    ``roll_model`` None: the rollout is two-pass CFG at cfg_scale_sampling with ``model``; else one
    pass of ``roll_model`` (a family whose sampler runs another velocity). ``skip_rollout`` is the
    negative control (plain SFT on the ideal state)."""
    sigmas, timesteps = grid_lists()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(z0.shape[0]):
        z, i = reference_drift(model, roll_model, z0, cond, uncond, cfg, draws, b, skip_rollout)
        noise, x0 = draws.z1[b].double(), z0[b].double()
        w = float(compute_loss_weighting_for_sd3(cfg.weighting_scheme, torch.tensor([sigmas[i]])))
        total = total + w * ((f64(model, z, timesteps[i], cond, b) - (noise - x0)) ** 2).mean()
    return total / z0.shape[0]


def run(model: nn.Module, *args, per_term: bool = False, **kwargs) -> tuple[Tensor, dict, object]:
    module = model.model if isinstance(model, Recorder) else model
    zero_grads(module)
    if per_term:
        report = scheduled_loss(model, *args, backward=lambda term, last: term.backward(), **kwargs)
    else:
        report = scheduled_loss(model, *args, **kwargs)
        report.loss.backward()
    return report.loss.detach(), grads_of(module), report


@pytest.mark.parametrize("rollout_kind", ["cfg", "single"])
@pytest.mark.parametrize("per_term", [False, True], ids=["joint", "per_term"])
def test_matches_plain_reference(grid: NoiseGrid, rollout_kind: str, per_term: bool) -> None:
    soar = SoarConfig(lambda_aux=0.0, num_sampling_steps=STEPS, cfg_scale_sampling=3.0)
    sched = ScheduledConfig(rollout_steps=3)
    model = make_model(torch.float64)
    roll_model = make_model(torch.float64, seed=7) if rollout_kind == "single" else None
    rollout = Rollout("single", velocity=roll_model) if roll_model is not None else None
    z0, cond, uncond = make_batch(len(PINNED_K), torch.float64)
    draws = pinned(torch.float64)
    loss, grads, report = run(
        model, z0, cond, uncond, grid, soar, sched, draws=draws, rollout=rollout, per_term=per_term
    )
    zero_grads(model)
    expected = reference_scheduled(model, roll_model, z0, cond, uncond, soar, draws)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=LOSS_RTOL, atol=0)
    assert_grads_close(grads, grads_of(model), rtol=GRAD_RTOL, scaled_atol=GRAD_SCALED_ATOL)
    assert report.grad_forwards == 1 and report.n_main == len(PINNED_K)


def test_reference_comparison_has_teeth(grid: NoiseGrid) -> None:
    """The rollout moves the gradient by far more than the tolerance: plain SFT would fail the test."""
    soar = SoarConfig(lambda_aux=0.0, num_sampling_steps=STEPS, cfg_scale_sampling=3.0)
    model = make_model(torch.float64)
    z0, cond, uncond = make_batch(len(PINNED_K), torch.float64)
    draws = pinned(torch.float64)
    _, grads, _ = run(model, z0, cond, uncond, grid, soar, ScheduledConfig(rollout_steps=3), draws=draws)
    zero_grads(model)
    reference_scheduled(model, None, z0, cond, uncond, soar, draws, skip_rollout=True).backward()
    assert not grads_close(grads, grads_of(model), rtol=GRAD_RTOL, scaled_atol=GRAD_SCALED_ATOL)


def sft_step(
    model: nn.Module,
    z0: Tensor,
    cond: dict,
    uncond: dict,
    noise_grid: NoiseGrid,
    soar: SoarConfig,
    draws: Draws,
) -> tuple[Tensor, dict]:
    zero_grads(model)
    report = soar_loss(model, z0, cond, uncond, noise_grid, soar, draws=draws)
    report.loss.backward()
    return report.loss.detach(), grads_of(model)


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
@pytest.mark.parametrize("batch", [4, 5])
def test_probability_zero_is_sft_bit_for_bit(grid: NoiseGrid, scheme: str, batch: int) -> None:
    """probability 0: the same draws, loss and gradient (torch.equal) as SFT, and the generator left
    where SFT leaves it, so every later step of the run is SFT's too."""
    soar = SoarConfig(lambda_aux=0.0, weighting_scheme=scheme, cond_dropout_rate=0.3)
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(batch, torch.float32)
    g_sft, g_sched = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    sft_loss, sft_grads = sft_step(model, z0, cond, uncond, grid, soar, Draws.sample(z0, soar, grid, g_sft))
    recorder = Recorder(model)
    sched = ScheduledConfig(rollout_steps=4, rollout_probability=0.0)
    loss, grads, report = run(recorder, z0, cond, uncond, grid, soar, sched, generator=g_sched)
    assert torch.equal(loss, sft_loss)
    assert_grads_equal(grads, sft_grads)
    assert torch.equal(g_sft.get_state(), g_sched.get_state())
    assert len(recorder.calls) == 1 and report.nograd_forwards == 0


def test_zero_offsets_is_sft_bit_for_bit(grid: NoiseGrid) -> None:
    soar = SoarConfig(lambda_aux=0.0)
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(5, torch.float32)
    draws = pinned(torch.float32, offsets=(0, 0, 0, 0, 0))
    sft_loss, sft_grads = sft_step(model, z0, cond, uncond, grid, soar, Draws(draws.z1, draws.t0))
    loss, grads, _ = run(model, z0, cond, uncond, grid, soar, ScheduledConfig(), draws=draws)
    assert torch.equal(loss, sft_loss)
    assert_grads_equal(grads, sft_grads)


def test_rollout_passes_and_batches(grid: NoiseGrid) -> None:
    """CFG: two no-grad passes per Euler step, each over the samples still walking (k > j); one grad pass."""
    soar = SoarConfig(lambda_aux=0.0, num_sampling_steps=STEPS)
    recorder = Recorder(make_model(torch.float32))
    z0, cond, uncond = make_batch(len(PINNED_K), torch.float32)
    draws = pinned(torch.float32)
    _, _, report = run(recorder, z0, cond, uncond, grid, soar, ScheduledConfig(3), draws=draws)
    walking = [sum(k > j for k in PINNED_K) for j in range(max(PINNED_K))]  # 4, 3, 2
    assert [c["batch"] for c in recorder.calls if not c["grad"]] == [n for n in walking for _ in (0, 1)]
    assert [c["batch"] for c in recorder.calls if c["grad"]] == [len(PINNED_K)]
    assert report.nograd_forwards == 2 * len(walking)


def test_rollout_times_end_at_target_and_clamp() -> None:
    t0 = torch.tensor(PINNED_T0)
    times = rollout_times(t0, torch.tensor(PINNED_K), STEPS)
    assert len(times) == max(PINNED_K) + 1
    for b, k in enumerate(PINNED_K):
        assert all(float(times[j][b]) == float(t0[b]) for j in range(k, len(times)))
        assert float(times[0][b]) == pytest.approx(min(float(t0[b]) + k / STEPS, 1.0))
    assert float(times[0][1]) == 1.0  # 0.9612 + 3/10 clamps at the pure-noise end


def test_draw_order_and_probability(grid: NoiseGrid) -> None:
    """cond drop, z1, t0 (SFT's draws), then offsets uniform in 0..N, then the apply mask."""
    soar = SoarConfig(lambda_aux=0.0, cond_dropout_rate=0.5)
    sched = ScheduledConfig(rollout_steps=3, rollout_probability=0.5)
    z0 = torch.zeros((64, 4, 2, 2))
    draws = ScheduledDraws.sample(z0, soar, sched, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sft = Draws.sample(z0, soar, grid, g)
    offsets = torch.randint(0, 4, (64,), generator=g)
    mask = torch.rand(64, generator=g) < 0.5
    assert torch.equal(draws.z1, sft.z1) and torch.equal(draws.t0, sft.t0)
    assert draws.drop_cond == sft.drop_cond
    assert torch.equal(draws.offsets, offsets * mask)
    assert int(draws.offsets.max()) <= 3 and 0 < int(draws.offsets.gt(0).sum()) < 64
    assert torch.equal(draws.select(slice(8, 16)).offsets, draws.offsets[8:16])


def test_cfg_rollout_needs_uncond(grid: NoiseGrid) -> None:
    model = make_model(torch.float32)
    z0, cond, _ = make_batch(len(PINNED_K), torch.float32)
    with pytest.raises(ValueError, match="uncond"):
        scheduled_loss(model, z0, cond, None, grid, SoarConfig(lambda_aux=0.0), ScheduledConfig(),
                       draws=pinned(torch.float32))  # fmt: skip
