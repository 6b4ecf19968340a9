"""EMA of the LoRA: the recurrence with its warm-up, exact state round trip, swap in and back."""

from __future__ import annotations

import pytest
import torch

from soar_lite.config import OptimConfig
from soar_lite.ema import LoraEMA
from soar_lite.errors import UserError


def test_ema_follows_the_warmed_up_recurrence():
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = LoraEMA([p], decay=0.9)
    expected = p.detach().clone()
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]):
        with torch.no_grad():
            p.fill_(value)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        ema.update([p])
        torch.testing.assert_close(ema.shadows[0], expected)
    assert ema.updates == 12 and ema.current_decay() == pytest.approx(13 / 22)  # still warming up
    ema.updates = 1000
    assert ema.current_decay() == 0.9  # capped at the configured decay


def test_state_round_trip_and_swap_restores_the_trained_weights():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    ema = LoraEMA(params, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        ema.update(params)
    other = LoraEMA(params, decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and all(
        torch.equal(a, b) for a, b in zip(other.shadows, ema.shadows, strict=True)
    )
    own = [p.detach().clone() for p in params]
    with ema.swapped_in(params):
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadows, strict=True))
        assert not torch.equal(params[0], own[0])
    assert all(torch.equal(p, o) for p, o in zip(params, own, strict=True))
    with pytest.raises(ValueError, match="holds 2 tensors"):
        LoraEMA(params[:1], decay=0.9).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_decay_is_a_one_line_error(bad):
    with pytest.raises(UserError, match="ema_decay"):
        OptimConfig(ema_decay=bad)
