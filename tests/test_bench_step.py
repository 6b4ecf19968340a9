"""The step benchmark measures what it says: its reference-style baseline computes the same loss as
soar-lite's step, SOAR's activation peak stays at SFT's while the baseline's grows with K."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from soar_lite.bench import step
from soar_lite.config import SoarConfig
from soar_lite.objective import Draws, NoiseGrid, soar_loss


def _batch(n: int = 2) -> tuple[torch.Tensor, dict, dict]:
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(n, 16, 16, 16, generator=g)
    cond = {
        "prompt_embeds": torch.randn(n, 5, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(n, 64, generator=g),
    }
    return z0, cond, {k: torch.zeros_like(v) for k, v in cond.items()}


@pytest.mark.parametrize("k", [1, 3])
def test_reference_style_step_has_the_same_loss_and_gradient(k):
    model, params = step.build_model(layers=1)
    with torch.no_grad():  # a non-zero LoRA, so the gradients reach both factors
        for p in params:
            p.normal_(0, 0.02)
    velocity = step.sd3_velocity(model)
    grid = NoiseGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    cfg = SoarConfig(trajectory_length=k, cfg_scale_sampling=3.0)
    z0, cond, uncond = _batch()
    draws = Draws.sample(z0, cfg, grid, torch.Generator().manual_seed(0))

    ours = soar_loss(velocity, z0, cond, uncond, grid, cfg, draws=draws).loss
    ours.backward()
    ours_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref = step.reference_style_loss(velocity, z0, cond, uncond, grid, cfg, draws)
    ref.backward()
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ours_grads, (p.grad for p in params), strict=True):
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-7)


def test_bench_step_record(tmp_path):
    out = tmp_path / "step.json"
    record = step.main(out, layers=1, batch=2, ks=(1, 3), repeats=1, warmup=0)
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    rows = record["variants"]
    assert set(rows) == {"sft", "soar_k1", "soar_k3", "reference_k3"}
    assert rows["soar_k3"]["flop_floor_ratio"] == pytest.approx((3 + 1 + 9) / 3)
    assert rows["soar_k1"]["memory_ratio_to_sft"] == pytest.approx(1.0)
    assert rows["soar_k3"]["memory_ratio_to_sft"] == pytest.approx(1.0)
    # the baseline keeps 1 + K forward graphs plus the rollout's: its peak grows with K
    assert rows["reference_k3"]["memory_ratio_to_sft"] > 3.0
    assert all(t > 0 for t in record["pass_costs_s"].values())
    assert record["summary"]["soar_k3_time_over_passes"] == pytest.approx(rows["soar_k3"]["time_over_passes"])
