"""Block swap: N transformer blocks' frozen base weights live in system RAM and visit the GPU one
block ahead of use (``model.swap_blocks=N``).

Why: the frozen base is most of a small card's peak (FLUX.1-dev in NF4 is ~6.2 GiB of an 8 GB
card's memory); with gradient checkpointing a block's weights are needed only while that block
runs, once in the forward and once more for its recompute in the backward. So the GPU needs to hold
only the blocks in flight, at the cost of copying the swapped weights over PCIe twice per trained
pass (once per no-grad pass): the planner states that traffic (``soar-lite plan``).

How, and why this way:

* A forward pre-hook on every block knows which block runs next (its index and the direction of
  travel: forward 0..L-1, recompute L-1..0), makes sure that block's weights are on the device
  and starts copying the *next* swapped block's weights on a side CUDA stream, so the copy overlaps
  the current block's compute. Before a block runs, the compute stream waits for its copy's event;
  the copies are marked as used by the compute stream so the allocator never reuses them early.
* At most ``window`` (2: the running block and the prefetched one) swapped blocks are resident;
  bringing a third in evicts the least recently used. Eviction only drops the block's references to
  its device copies: whatever autograd still holds (a recomputed block's saved tensors) stays valid
  until its backward has used it, so no eviction can corrupt a gradient.
* Only frozen tensors move (``requires_grad=False`` parameters, buffers, bitsandbytes' quantization
  statistics); the LoRA parameters of a swapped block never leave the device, so the optimizer,
  gradient clipping and DDP see the same tensors with swap on or off.
* bitsandbytes NF4 / int8 weights move as they are (packed bytes + their statistics, copied rather
  than shared, because ``Params4bit.to`` moves its quantization state in place).
* Without gradient checkpointing the backward would keep every block's weights alive through its
  saved tensors, so the config refuses ``swap_blocks`` without it.

The home copies are pinned (page-locked) on CUDA so the copies can be asynchronous; one copy of
each swapped weight exists in RAM: the block-by-block loader (:mod:`soar_lite.blockload`) parks a
swapped block there as it reads it (``park``), and the swap takes those pinned copies as they are;
a model loaded whole is moved out one block at a time at install, never a second full copy. On
the CPU (tests, ``soar-lite bench swap``) the "device" copy is a clone, and ``poison=True`` fills
an evicted block with NaN so that any use of it without its swap-in fails.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from soar_lite.errors import UserError

log = logging.getLogger("soar_lite.train")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # SD3, FLUX (double, single), Qwen-Image
WINDOW = 2  # swapped blocks resident at once: the running one and the one being prefetched
RAM_SHARE = 0.9  # of the RAM available at install the swapped weights may take (pinned pages stay put)


def available_ram_bytes() -> int | None:
    """System RAM available now (Linux ``MemAvailable``; None where unknown: no check)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def blocks_of(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks in the order a forward runs them (DDP wrapper unwrapped)."""
    model = getattr(transformer, "module", transformer)
    out: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        out.extend(getattr(model, name, None) or ())
    if not out:
        raise UserError(f"model.swap_blocks: {type(model).__name__} has no transformer block lists to swap")
    return out


def frozen_bytes(module: torch.nn.Module, *, off_cpu: bool = False) -> int:
    """Bytes a swap moves for ``module``: its frozen parameters and buffers (bnb statistics included);
    ``off_cpu``: only those not already in system RAM (what moving the block out adds to it)."""
    total = 0
    for sub in module.modules():
        tensors = [p for p in sub._parameters.values() if p is not None and not p.requires_grad]
        tensors += [b for b in sub._buffers.values() if b is not None]
        state = getattr(sub, "state", None)
        tensors += [t for t in (getattr(state, "SCB", None),) if isinstance(t, Tensor)]
        tensors = [t for t in tensors if not (off_cpu and t.device.type == "cpu")]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def check_ram(wanted: int, count: int) -> None:
    """Refuse, before anything moves, a swap whose blocks would not fit the RAM available now."""
    free = available_ram_bytes()
    if free is not None and wanted > RAM_SHARE * free:
        raise UserError(
            f"model.swap_blocks={count} needs {wanted / 2**30:.1f} GiB of system RAM and "
            f"{free / 2**30:.1f} GiB is available: swap fewer blocks or free memory"
        )


def park(block: torch.nn.Module, device: torch.device | str) -> None:
    """Give ``block``'s frozen tensors their system-RAM home copies now (pinned when ``device`` is a
    GPU), as a swap would: the block-by-block loader parks each swapped block as it is read, so the
    GPU never holds it; :class:`BlockSwap` later takes the pinned copies as they are."""
    _slots(block, device, pin=torch.device(device).type == "cuda")


@dataclass
class _Slot:
    """One frozen tensor of a block: where it is held (``put``) and its home copy in system RAM."""

    home: Tensor
    put: Callable[[Tensor | None], None]  # None: hold the home copy (evicted)
    quant_state: Any = None  # Params4bit: the CPU statistics, copied for each device twin


@dataclass
class _Block:
    index: int
    module: torch.nn.Module
    slots: list[_Slot] = field(default_factory=list)
    twins: list[Tensor] | None = None  # the device copies while resident
    event: Any = None  # CUDA event recorded after the copy (None on the CPU)
    active: bool = False  # the twins are what the module holds


class BlockSwap:
    """Keeps the last ``count`` blocks' frozen weights in system RAM (see the module docstring)."""

    def __init__(self, transformer: torch.nn.Module, count: int, device: torch.device | str,
                 *, poison: bool = False, window: int = WINDOW) -> None:  # fmt: skip
        blocks = blocks_of(transformer)
        if not 0 <= count <= len(blocks):
            n = len(blocks)
            raise UserError(f"model.swap_blocks={count}: the transformer has {n} blocks (use 0..{n})")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.poison, self.window = poison, max(window, 1)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        # before anything moves: no OOM half-way (blocks the loader parked are in RAM already)
        check_ram(sum(frozen_bytes(b, off_cpu=self.cuda) for b in blocks[len(blocks) - count :]), count)
        self.order = list(range(len(blocks)))
        self.swapped: dict[int, _Block] = {}
        self.resident: list[int] = []  # least recently used first
        self.last = -1
        self.copies = 0  # blocks copied in (for the bench and the tests)
        self.copied_bytes = 0
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        for index in range(len(blocks) - count, len(blocks)):  # one block at a time: never a second full copy
            block = _Block(index, blocks[index], _slots(blocks[index], self.device, pin=self.cuda))
            for slot in block.slots:
                slot.put(None if not poison else _poisoned(slot.home))
            self.swapped[index] = block
        if self.cuda:
            torch.cuda.empty_cache()
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(blocks)]
        self.swapped_bytes = sum(_block_bytes(b) for b in self.swapped.values())

    # ------------------------------------------------------------------ hooks

    def _hook(self, index: int) -> Callable[[torch.nn.Module, Any], None]:
        def pre_forward(module: torch.nn.Module, args: Any) -> None:
            direction = 1 if index >= self.last else -1
            self.last = index
            if index in self.swapped:
                self._activate(self.swapped[index])
            ahead = self._next_swapped(index, direction)
            if ahead is not None:
                self._fetch(self.swapped[ahead], keep=index)

        return pre_forward

    def _next_swapped(self, index: int, direction: int) -> int | None:
        """The swapped block that will run after ``index`` when travelling in ``direction``; at the end
        of a pass the travel reverses (forward -> recompute, recompute -> next forward)."""
        for step in (direction, -direction):
            candidates = [i for i in self.swapped if (i - index) * step > 0]
            if candidates:
                return min(candidates, key=lambda i: abs(i - index))
        return None

    def _fetch(self, block: _Block, keep: int) -> None:
        """Start copying ``block`` to the device (side stream on CUDA), evicting the least recently
        used resident block other than ``keep`` if the window is full."""
        if block.index in self.resident:
            self.resident.remove(block.index)
            self.resident.append(block.index)
            return
        while len(self.resident) >= self.window:
            victim = next((i for i in self.resident if i != keep), None)
            if victim is None:
                break
            self._evict(self.swapped[victim])
        if self.cuda:
            with torch.cuda.stream(self.stream):
                block.twins = [_twin_data(s.home, self.device) for s in block.slots]
                block.event = torch.cuda.Event()
                block.event.record(self.stream)
        else:
            block.twins = [s.home.clone() for s in block.slots]
        self.resident.append(block.index)
        self.copies += 1
        nbytes = _block_bytes(block)
        self.copied_bytes += nbytes
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _activate(self, block: _Block) -> None:
        """Make the module hold its device copies (waiting for their copy on CUDA)."""
        self._fetch(block, keep=block.index)
        if block.active:
            return
        if block.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(block.event)
            for twin in block.twins or ():
                twin.record_stream(compute)
            block.event = None
        for slot, twin in zip(block.slots, block.twins or (), strict=True):
            slot.put(twin)
        block.active = True

    def _evict(self, block: _Block) -> None:
        for slot in block.slots:
            slot.put(None if not self.poison else _poisoned(slot.home))
        block.twins, block.event, block.active = None, None, False
        self.resident.remove(block.index)
        self.resident_bytes -= _block_bytes(block)

    # ------------------------------------------------------------------ lifetime

    def release(self) -> None:
        """Evict every resident block (e.g. before sampling with another pipeline)."""
        for index in list(self.resident):
            self._evict(self.swapped[index])

    def remove(self) -> None:
        """Put every swapped block back on the device for good and drop the hooks."""
        self.release()
        for handle in self.handles:
            handle.remove()
        for block in self.swapped.values():
            for slot in block.slots:
                slot.put(_twin_data(slot.home, self.device) if self.cuda else slot.home.clone())
        self.swapped.clear()


def install(transformer: torch.nn.Module, count: int, device: torch.device | str) -> BlockSwap | None:
    """``model.swap_blocks``: swap the last ``count`` blocks of ``transformer`` (None when 0)."""
    if count == 0:
        return None
    swap = BlockSwap(transformer, count, device)
    log.info("block swap: %d of %d blocks (%.2f GiB of base weights) in system RAM",
             count, len(swap.order), swap.swapped_bytes / 2**30)  # fmt: skip
    return swap


# ---------------------------------------------------------------------- tensors of a block


def _block_bytes(block: _Block) -> int:
    return sum(s.home.numel() * s.home.element_size() for s in block.slots)


def _home(t: Tensor, pin: bool) -> Tensor:
    """The system-RAM copy of ``t`` (pinned for asynchronous copies when the device is a GPU)."""
    if pin and t.device.type == "cpu" and t.is_pinned():  # parked by the loader: already its home
        return t.detach()
    if pin:  # straight into page-locked memory: one copy, no pageable stop on the way
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach())
        except RuntimeError as exc:  # page-locked memory is limited on some systems: slower, still right
            log.warning("block swap: cannot pin %d bytes (%s): copies will be synchronous",
                        t.numel() * t.element_size(), str(exc).splitlines()[0])  # fmt: skip
    return t.detach().to("cpu", copy=t.device.type == "cpu")


def _twin_data(home: Tensor, device: torch.device) -> Tensor:
    return home.to(device, non_blocking=True)


def _poisoned(home: Tensor) -> Tensor:
    """A same-shaped stand-in that makes any use visible: NaN for floats, a constant for packed bytes."""
    if home.is_floating_point():
        return torch.full_like(home, float("nan"))
    return torch.full_like(home, 3)


def _slots(module: torch.nn.Module, device: torch.device | str, pin: bool) -> list[_Slot]:
    """Every frozen tensor of ``module``'s submodules, moved to a home copy in system RAM."""
    slots: list[_Slot] = []
    for sub in module.modules():
        _init_int8_state(sub)
        for name, param in list(sub._parameters.items()):
            if param is None or param.requires_grad:
                continue  # LoRA parameters stay on the device
            slots.append(_param_slot(sub, name, param, pin, torch.device(device)))
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                slots.append(_table_slot(sub._buffers, name, _home(buf, pin), lambda t: t))
        state = getattr(sub, "state", None)
        if state is not None and getattr(state, "SCB", None) is not None:  # bnb int8 row scales
            slots.append(_attr_slot(state, "SCB", _home(state.SCB, pin)))
    return slots


def _init_int8_state(sub: torch.nn.Module) -> None:
    """bnb's Linear8bitLt moves its int8 weight and scales into ``state`` at its first forward: do it
    now, so the swap sees where they will be held (``state.CB`` is the weight's data)."""
    weight = getattr(sub, "weight", None)
    if hasattr(sub, "init_8bit_state") and getattr(weight, "CB", None) is not None:
        sub.init_8bit_state()


def _param_slot(sub: torch.nn.Module, name: str, param: Tensor, pin: bool, device: torch.device) -> _Slot:
    home = _home(param.data, pin)
    kind = type(param).__name__
    if kind == "Params4bit":
        qs_home = _quant_state_to(param.quant_state, "cpu")
        slot = _Slot(home, lambda t: None, qs_home)

        def wrap4(t: Tensor) -> Tensor:
            qs = qs_home if t is home else _quant_state_to(qs_home, t.device)
            return type(param)(t, requires_grad=False, quant_state=qs, blocksize=param.blocksize,
                               compress_statistics=param.compress_statistics, quant_type=param.quant_type,
                               quant_storage=param.quant_storage, bnb_quantized=True)  # fmt: skip

        slot.put = _putter(sub._parameters, name, home, wrap4)
        slot.put(None)
        return slot
    if kind == "Int8Params":
        state = getattr(sub, "state", None)

        def wrap8(t: Tensor) -> Tensor:
            twin = type(param)(t, requires_grad=False, has_fp16_weights=False)
            if state is not None:
                state.CB = t  # Linear8bitLt multiplies with state.CB, and resets weight.data to it
            return twin

        return _table_slot(sub._parameters, name, home, wrap8)
    return _table_slot(sub._parameters, name, home,
                       lambda t: torch.nn.Parameter(t, requires_grad=False))  # fmt: skip


def _putter(table: dict[str, Any], name: str, home: Tensor, wrap: Callable[[Tensor], Any]) -> Callable:
    def put(t: Tensor | None) -> None:
        table[name] = wrap(home if t is None else t)

    return put


def _table_slot(table: dict[str, Any], name: str, home: Tensor, wrap: Callable[[Tensor], Any]) -> _Slot:
    slot = _Slot(home, _putter(table, name, home, wrap))
    slot.put(None)
    return slot


def _attr_slot(owner: Any, name: str, home: Tensor) -> _Slot:
    def put(t: Tensor | None) -> None:
        setattr(owner, name, home if t is None else t)

    put(None)
    return _Slot(home, put)


def _quant_state_to(state: Any, device: torch.device | str) -> Any:
    """A copy of a bnb ``QuantState`` on ``device`` (its own ``to`` moves the shared state in place)."""
    if state is None:
        return None
    new = copy.copy(state)
    if getattr(state, "nested", False) and getattr(state, "state2", None) is not None:
        new.state2 = copy.copy(state.state2)
    new.to(device)
    return new


def swap_counts(total: int) -> Sequence[int]:
    """Swap settings the bench compares: none, half and all of ``total`` blocks."""
    return (0, total // 2, total)
