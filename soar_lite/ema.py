"""An exponential moving average of the LoRA weights (``optim.ema_decay``; 0 = off).

A LoRA's last step is one noisy point of the optimizer's path; the average of its recent steps is
usually the smoother adapter (users of other trainers keep asking for it). The average is kept in
fp32 next to the adapter (a LoRA is small: this costs one more copy of the adapter), updated after
every optimizer step, saved in every checkpoint so resume stays exact, and written at the end as
``pytorch_lora_weights_ema.safetensors`` beside the raw LoRA file.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (diffusers' EMAModel
does the same), so the first steps are not averaged with the untrained initial adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from soar_lite.run_folder import EMA_FILE

__all__ = ["EMA_FILE", "LoraEMA"]


class LoraEMA:
    """fp32 shadows of ``params`` (same order), updated by :meth:`update` after optimizer steps."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadows = [p.detach().float().clone() for p in params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params: Sequence[torch.nn.Parameter]) -> None:
        d = self.current_decay()
        for shadow, p in zip(self.shadows, params, strict=True):
            shadow.lerp_(p.detach().float(), 1 - d)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Inside the block ``params`` hold the averages (to save or sample them), then their own."""
        saved = [p.detach().clone() for p in params]
        for p, shadow in zip(params, self.shadows, strict=True):
            p.copy_(shadow)
        try:
            yield
        finally:
            for p, own in zip(params, saved, strict=True):
                p.copy_(own)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors for a checkpoint (safetensors): the shadows by position, and the update count."""
        out = {f"shadow.{i}": s.detach().cpu().clone() for i, s in enumerate(self.shadows)}
        out["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        count = sum(1 for key in state if key.startswith("shadow."))
        if count != len(self.shadows):
            raise ValueError(f"EMA state holds {count} tensors, this adapter has {len(self.shadows)}")
        for i, shadow in enumerate(self.shadows):
            shadow.copy_(state[f"shadow.{i}"])
        self.updates = int(state["updates"])
