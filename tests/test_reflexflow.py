"""Tests of ReflexFlow (soar_lite/objectives.py, steps R1-R3) against its definition in that docstring.

``reference_reflexflow`` restates R1-R3 sample by sample in float64 on the drifted state of the
scheduled-sampling reference (tests/test_objectives.py), sharing no helper with the implementation:
an explicit clean pass, elementwise weights from the sample's own sum, norms by hand. With the draws
pinned, value and gradient must agree; references without the frequency weights or without the
anti-drift term must not (each part has teeth). The limit: alpha = beta1 = 0, beta2 = 1 is
scheduled sampling bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import Tensor, nn

from soar_lite.config import ReflexFlowConfig, ScheduledConfig, SoarConfig
from soar_lite.objective import NoiseGrid, Rollout
from soar_lite.objectives import reflexflow_loss, scheduled_loss
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
from tests.test_objectives import PINNED_K, STEPS, f64, grid_lists, pinned, reference_drift

LOSS_RTOL, GRAD_RTOL, GRAD_SCALED_ATOL = 1e-5, 1e-4, 1e-5
REFLEX = ReflexFlowConfig(
    fc_alpha=3.0, adr_weight=10.0, fc_weight=0.7
)  # alpha large enough for the weights to matter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grid() -> NoiseGrid:
    return NoiseGrid.from_scheduler(make_scheduler())


def reference_reflexflow(
    model: nn.Module,
    roll_model: nn.Module | None,
    z0: Tensor,
    cond: dict,
    uncond: dict,
    cfg: SoarConfig,
    draws,
    reflex: ReflexFlowConfig,
    *,
    with_fc: bool = True,
    with_adr: bool = True,
) -> Tensor:
    """R1-R3 per sample in float64; ``with_fc`` / ``with_adr`` False are the negative controls."""
    sigmas, timesteps = grid_lists()
    eps = 1e-6
    total = torch.zeros((), dtype=torch.float64)
    for b in range(z0.shape[0]):
        z_drift, i = reference_drift(model, roll_model, z0, cond, uncond, cfg, draws, b)
        x0, noise, s = z0[b].double(), draws.z1[b].double(), sigmas[i]
        v = f64(model, z_drift, timesteps[i], cond, b)
        weight = torch.ones_like(v)
        if int(draws.offsets[b]) > 0 and with_fc:
            with torch.no_grad():
                z_ideal = (1 - s) * x0 + s * noise
                clean = f64(model, z_ideal, timesteps[i], cond, b)
                exposure = clean - f64(model, z_drift, timesteps[i], cond, b)  # R1
            weight = 1.0 + reflex.fc_alpha * exposure / max(float(exposure.abs().sum()), eps)  # R2
        w_s = float(compute_loss_weighting_for_sd3(cfg.weighting_scheme, torch.tensor([s])))
        term = reflex.fc_weight * w_s * (weight * (v - (noise - x0)) ** 2).mean()
        if with_adr:
            drift = (z_drift - x0).flatten()
            pred = v.flatten()
            pred_dir = pred / torch.sqrt((pred**2).sum()).clamp_min(eps)
            drift_dir = drift / torch.sqrt((drift**2).sum()).clamp_min(eps)
            term = term + reflex.adr_weight * ((pred_dir - drift_dir) ** 2).sum()  # R3
        total = total + term
    return total / z0.shape[0]


def run(model: nn.Module, *args, per_term: bool = False, **kwargs) -> tuple[Tensor, dict, object]:
    module = model.model if isinstance(model, Recorder) else model
    zero_grads(module)
    if per_term:
        report = reflexflow_loss(model, *args, backward=lambda term, last: term.backward(), **kwargs)
    else:
        report = reflexflow_loss(model, *args, **kwargs)
        report.loss.backward()
    return report.loss.detach(), grads_of(module), report


def _setup(rollout_kind: str = "cfg"):
    soar = SoarConfig(lambda_aux=0.0, num_sampling_steps=STEPS, cfg_scale_sampling=3.0)
    model = make_model(torch.float64)
    roll_model = make_model(torch.float64, seed=7) if rollout_kind == "single" else None
    z0, cond, uncond = make_batch(len(PINNED_K), torch.float64)
    return soar, model, roll_model, z0, cond, uncond, pinned(torch.float64)


@pytest.mark.parametrize("rollout_kind", ["cfg", "single"])
@pytest.mark.parametrize("per_term", [False, True], ids=["joint", "per_term"])
def test_matches_plain_reference(grid: NoiseGrid, rollout_kind: str, per_term: bool) -> None:
    soar, model, roll_model, z0, cond, uncond, draws = _setup(rollout_kind)
    rollout = Rollout("single", velocity=roll_model) if roll_model is not None else None
    loss, grads, report = run(
        model, z0, cond, uncond, grid, soar, ScheduledConfig(3), REFLEX,
        draws=draws, rollout=rollout, per_term=per_term,
    )  # fmt: skip
    zero_grads(model)
    expected = reference_reflexflow(model, roll_model, z0, cond, uncond, soar, draws, REFLEX)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=LOSS_RTOL, atol=0)
    assert_grads_close(grads, grads_of(model), rtol=GRAD_RTOL, scaled_atol=GRAD_SCALED_ATOL)
    assert report.grad_forwards == 1 and report.n_main == report.n_aux == len(PINNED_K)


@pytest.mark.parametrize("part", ["fc", "adr"])
def test_each_part_has_teeth(grid: NoiseGrid, part: str) -> None:
    """Dropping the frequency weights, or the anti-drift term, moves the gradient past the tolerance."""
    soar, model, _, z0, cond, uncond, draws = _setup()
    _, grads, _ = run(model, z0, cond, uncond, grid, soar, ScheduledConfig(3), REFLEX, draws=draws)
    zero_grads(model)
    reference_reflexflow(
        model, None, z0, cond, uncond, soar, draws, REFLEX, with_fc=part != "fc", with_adr=part != "adr"
    ).backward()
    assert not grads_close(grads, grads_of(model), rtol=GRAD_RTOL, scaled_atol=GRAD_SCALED_ATOL)


def test_off_is_scheduled_sampling_bit_for_bit(grid: NoiseGrid) -> None:
    soar = SoarConfig(lambda_aux=0.0, num_sampling_steps=STEPS)
    model = make_model(torch.float32)
    z0, cond, uncond = make_batch(len(PINNED_K), torch.float32)
    draws = pinned(torch.float32)
    zero_grads(model)
    sched = scheduled_loss(model, z0, cond, uncond, grid, soar, ScheduledConfig(3), draws=draws)
    sched.loss.backward()
    sched_grads = grads_of(model)
    off = ReflexFlowConfig(fc_alpha=0.0, adr_weight=0.0, fc_weight=1.0)
    loss, grads, _ = run(model, z0, cond, uncond, grid, soar, ScheduledConfig(3), off, draws=draws)
    assert torch.equal(loss, sched.loss.detach())
    assert_grads_equal(grads, sched_grads)


def test_one_clean_pass_over_rolled_samples(grid: NoiseGrid) -> None:
    """R1 costs one no-grad pass over the samples with k > 0 (on top of the rollout's passes)."""
    soar = SoarConfig(lambda_aux=0.0, num_sampling_steps=STEPS)
    recorder = Recorder(make_model(torch.float32))
    z0, cond, uncond = make_batch(len(PINNED_K), torch.float32)
    _, _, report = run(recorder, z0, cond, uncond, grid, soar, ScheduledConfig(3), REFLEX,
                       draws=pinned(torch.float32))  # fmt: skip
    rolled = sum(k > 0 for k in PINNED_K)
    rollout_passes = 2 * max(PINNED_K)  # CFG: two per Euler step
    nograd = [c["batch"] for c in recorder.calls if not c["grad"]]
    assert len(nograd) == rollout_passes + 1 and nograd[-1] == rolled
    assert report.nograd_forwards == rollout_passes + 1
