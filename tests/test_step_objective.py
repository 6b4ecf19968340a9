"""Per-step objective knobs: lambda warm-up and the SOAR-step probability (deterministic, resumable)."""

from __future__ import annotations

import torch

from soar_lite import config
from soar_lite.train import step_objective


def test_lambda_warmup_ramps_linearly_then_holds():
    cfg = config.load_config("cpu-tiny", ["lambda_aux=2.0", "lambda_warmup_steps=4"])
    g = torch.Generator().manual_seed(0)
    assert [step_objective(cfg, s, g).lambda_aux for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_sft_arm_stays_sft_whatever_the_knobs():
    cfg = config.load_config("cpu-tiny", ["objective=sft", "lambda_warmup_steps=4", "probability=0.5"])
    assert step_objective(cfg, 3, torch.Generator().manual_seed(0)).lambda_aux == 0.0


def test_soar_probability_skips_steps_reproducibly_from_the_generator():
    cfg = config.load_config("cpu-tiny", ["probability=0.25"])

    def pattern() -> list[float]:
        g = torch.Generator().manual_seed(7)
        return [step_objective(cfg, s, g).lambda_aux for s in range(400)]

    first = pattern()
    assert first == pattern()
    share = sum(lam > 0 for lam in first) / len(first)
    assert 0.17 < share < 0.33
