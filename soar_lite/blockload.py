"""Load a transformer block by block: built without weights, then each block read from its
safetensors, cast, quantized and put where it will live (the GPU, or system RAM when swapped).

Why: ``from_pretrained`` followed by ``.to(device)`` holds the whole base on the GPU before a
block swap can move anything out (Qwen-Image is ~40 GB in bf16, ~11 GB in NF4: more than the
16 GB card that swap is meant for), and diffusers' bitsandbytes load quantizes on the GPU only.
Here the GPU never holds more than the resident blocks plus the one being placed, and system RAM
never more than the swapped blocks plus the one being read: one copy of every weight, no second
full copy (issue 14). One loader and one quantization function serve the CPU and the GPU, so the
layout the tests check is the one a card trains.

Swapped blocks (the last ``swap_blocks``, the ones :class:`soar_lite.swap.BlockSwap` moves) are
quantized on the CPU, where they stay; every other block's linears are quantized on their way to
the device, one at a time (bitsandbytes quantizes on a move from the CPU: int8 only then), and the
rest of the block follows. Everything outside the blocks (embedders, final norm and projection)
stays in the base dtype, as the quantization module's ``KEEP_DENSE`` says.

Only a folder holding ``diffusion_pytorch_model.safetensors`` (or its sharded index) is read this
way (a local pipeline's ``transformer/``, or a hub id's fetched alone: ``families.common``);
anything else (``.bin`` weights, variants, torchao quantization) takes the plain ``from_pretrained``
path (``has_checkpoint`` is False for it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from soar_lite.errors import UserError
from soar_lite.swap import BLOCK_LISTS, blocks_of, check_ram, park

log = logging.getLogger("soar_lite.train")
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def has_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds safetensors this loader reads (file names only: nothing is opened)."""
    return (Path(folder) / INDEX).is_file() or (Path(folder) / WEIGHTS).is_file()


def checkpoint_keys(folder: str | Path) -> dict[str, Path] | None:
    """Every tensor name of the transformer folder's safetensors and the file holding it (None when
    the folder has none: the caller loads with ``from_pretrained``)."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / WEIGHTS).is_file():
        with safe_open(str(folder / WEIGHTS), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), folder / WEIGHTS)
    return None


def block_prefixes(model: torch.nn.Module) -> list[str]:
    """The state-dict prefix of each block, in the order a forward runs them (``blocks_of``'s)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(block)] + "." for block in blocks_of(model)]


def load_blockwise(
    cls: Any,
    folder: str | Path,
    dtype: torch.dtype,
    quant: str,
    device: torch.device | str,
    swap_blocks: int = 0,
    *,
    on_group: Callable[[str, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """``cls`` (a diffusers transformer class) from ``folder`` (its ``transformer`` subfolder), frozen,
    one block at a time; the last ``swap_blocks`` blocks stay in system RAM (quantized there).

    ``on_group(prefix, model)`` is called after each group (``""``: everything outside the blocks,
    then each block's prefix) is in place: the tests watch where the memory is at every step."""
    from accelerate import init_empty_weights

    device = torch.device(device)
    files = checkpoint_keys(folder)
    if files is None:
        raise UserError(f"{folder} holds no {WEIGHTS}")
    with init_empty_weights(), _default_dtype(dtype):
        model = cls.from_config(cls.load_config(str(folder)))
    model.requires_grad_(False)
    prefixes = block_prefixes(model)
    parked = set(prefixes[len(prefixes) - swap_blocks :]) if swap_blocks else set()
    groups = _group_keys(files, prefixes)
    with _Reader() as reader:
        check_ram(_parked_bytes(groups, parked, files, reader, quant, dtype), swap_blocks)  # nothing read yet
        read = reader.read
        _load_into(model, "", groups.get("", []), read, files, dtype)
        rest = [(name, child) for name, child in model.named_children() if name not in BLOCK_LISTS]
        for name, child in rest:
            _check_complete(child, name + ".", folder, model)
            child.to(device)
        if on_group is not None:
            on_group("", model)
        for prefix, block in zip(prefixes, blocks_of(model), strict=True):
            _load_into(block, prefix, groups.get(prefix, []), read, files, dtype)
            _check_complete(block, prefix, folder, model)
            where = torch.device("cpu") if prefix in parked else device
            if quant in ("nf4", "int8"):  # each linear quantized on its way to ``where``, from RAM
                from soar_lite.quant import quantize_bnb_linears

                quantize_bnb_linears(block, quant, dtype, where)
            block.to(where)
            if prefix in parked:
                park(block, device)  # its home copies, pinned for the swap's copies when on CUDA
            if on_group is not None:
                on_group(prefix, model)
    return model


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build under the load dtype, as ``from_pretrained`` does (buffers made in ``__init__`` follow it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else before)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _group_keys(files: dict[str, Path], prefixes: list[str]) -> dict[str, list[str]]:
    """Tensor names by group: the block prefix each starts with, ``""`` for the rest."""
    groups: dict[str, list[str]] = {}
    for key in files:
        owner = next((p for p in prefixes if key.startswith(p)), "")
        groups.setdefault(owner, []).append(key)
    return groups


class _Reader:
    """Open safetensors files, each opened once; a tensor is read when asked for (one at a time)."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.handles: dict[Path, Any] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _handle(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(safe_open(str(file), framework="pt"))
        return self.handles[file]

    def read(self, file: Path, key: str) -> Tensor:
        return self._handle(file).get_tensor(key)

    def shape(self, file: Path, key: str) -> list[int]:
        """A tensor's shape from the file's header (no data read)."""
        return self._handle(file).get_slice(key).get_shape()


def _load_into(module: torch.nn.Module, prefix: str, keys: list[str], read: Callable,
               files: dict[str, Path], dtype: torch.dtype) -> None:  # fmt: skip
    """The group's tensors into ``module`` (floating ones cast to ``dtype``), replacing its meta ones."""
    state = {}
    for key in keys:
        tensor = read(files[key], key)
        state[key[len(prefix) :]] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    unexpected = module.load_state_dict(state, strict=False, assign=True).unexpected_keys
    if unexpected:
        log.warning("load: %d tensors in the checkpoint fit no parameter (e.g. %s): ignored",
                    len(unexpected), prefix + unexpected[0])  # fmt: skip
    module.requires_grad_(False)


def _parked_bytes(groups: dict[str, list[str]], parked: set[str], files: dict[str, Path],
                  reader: _Reader, quant: str, dtype: torch.dtype) -> int:  # fmt: skip
    """System RAM the swapped blocks will take, from the safetensors headers (no tensor read):
    linear weights (2-D) at the planner's quantized size, everything else in ``dtype``."""
    import math

    from soar_lite.plan import QUANT_BYTES

    per_param = torch.empty((), dtype=dtype).element_size()
    linear = QUANT_BYTES[quant] or per_param
    total = 0.0
    for prefix in parked:
        for key in groups.get(prefix, []):
            shape = reader.shape(files[key], key)
            total += math.prod(shape) * (linear if len(shape) == 2 else per_param)
    return int(total)


def _check_complete(module: torch.nn.Module, prefix: str, folder: str | Path, model: torch.nn.Module) -> None:
    """Every tensor of the group just read got a value: a checkpoint that lacks one is a clear error
    (checked before the group moves: on the device a missing value could no longer be told apart)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    missing = [prefix + name for name, t in tensors if t.is_meta]
    if missing:
        raise UserError(
            f"{folder}: the checkpoint has no values for {len(missing)} tensors of {type(model).__name__} "
            f"(e.g. {missing[0]}): is it a different model or an incomplete download?"
        )
