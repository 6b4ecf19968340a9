"""Where the text encoders sit while the cache stage encodes prompts.

SD3.5's three text encoders take ~11 GB in bf16 (T5-XXL alone ~9 GB): more than an 8 or 12 GB card
holds, although the *training* stage fits in a few GB (the encoders are freed before it). Loading
them all onto the GPU is the "12G preset OOMs while caching" of other trainers. The cache stage
therefore picks, from the encoders' sizes and the GPU memory it has:

* ``none``: every encoder on the GPU (all fit, with headroom);
* ``model``: one encoder on the GPU at a time, moved in before its forward and the previous one
  moved back to system RAM (the largest fits alone): a few seconds of transfers per chunk;
* ``sequential``: layers stream through the GPU one at a time (accelerate's ``cpu_offload``): the
  GPU holds one layer, at the cost of moving every weight for every chunk of prompts.

Embeddings do not depend on the choice (same kernels on the same device), so it is not part of
the cache key. The planner uses the same rule for a tier (``soar-lite plan``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODES = ("auto", "none", "model", "sequential")
HEADROOM_BYTES = 1.0 * 2**30  # encoding activations, CUDA context, allocator slack
HEADROOM_SHARE = 0.10


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what moving it to a device costs)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def choose(sizes: Sequence[int], budget: float | None) -> str:
    """``none`` if all of ``sizes`` fit ``budget`` bytes at once, ``model`` if the largest fits
    alone, else ``sequential``; ``none`` without a budget (CPU: nothing to offload to)."""
    if budget is None or not sizes:
        return "none"
    usable = budget * (1 - HEADROOM_SHARE) - HEADROOM_BYTES
    if sum(sizes) <= usable:
        return "none"
    if max(sizes) <= usable:
        return "model"
    return "sequential"


def free_device_bytes(device: torch.device) -> float | None:
    """Free memory of a CUDA device (None on CPU, where offloading has nothing to gain)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return float(free)


class OneResident:
    """Keeps at most one of several modules on ``device``: a forward pre-hook moves the module
    about to run onto it and the previous one back to the CPU."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.device = device
        self.resident: torch.nn.Module | None = None
        self.handles = [m.register_forward_pre_hook(self._bring) for m in modules]
        for module in modules:
            module.to("cpu")

    def _bring(self, module: torch.nn.Module, args: object) -> None:
        if self.resident is module:
            return
        if self.resident is not None:
            self.resident.to("cpu")
        module.to(self.device)
        self.resident = module

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.resident = None


def place(modules: Sequence[torch.nn.Module], mode: str, device: torch.device) -> OneResident | None:
    """Put ``modules`` on ``device`` the way ``mode`` says (see the module docstring)."""
    if mode == "none":
        for module in modules:
            module.to(device)
        return None
    if mode == "model":
        return OneResident(modules, device)
    if mode == "sequential":
        from accelerate import cpu_offload

        for module in modules:
            cpu_offload(module.to("cpu"), execution_device=device)
        return None
    raise ValueError(f"unknown encoder offload mode {mode!r} (one of {', '.join(MODES)})")
