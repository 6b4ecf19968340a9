"""LoKr and LoHa adapters (peft's), and their file: LyCORIS keys with the scale folded in.

Why peft and not ``lycoris-lora``: peft is already the library soar-lite's LoRA and DoRA come from,
its LoKr/LoHa layers attach through the same ``add_adapter`` and round-trip through the same
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``, so checkpoints, exact resume, EMA,
DDP's ignore list and gradient checkpointing need no second code path; and its parameter names are
LyCORIS's own (``lokr_w1``, ``lokr_w2_a``, ``hada_w1_a``...), which are the names ComfyUI's LoRA
loader reads. lycoris-lora would wrap the model in its own network object with its own save path.

The file (``pytorch_lora_weights.safetensors`` as for LoRA) holds, per adapted module,
``transformer.<module>.<factor>`` tensors and ``transformer.<module>.alpha``. ComfyUI's SD3 and FLUX
key maps take ``transformer.<diffusers module>`` names (the q/k/v of a fused SAI ``qkv`` become row
slices of it) and fuse

* LoKr: ``W += s * kron(w1, w2)`` with ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b`` (``w2`` alike),
  ``s = alpha / rank`` when a factor is low-rank (rank = that factor's inner size), else ``s = 1``;
* LoHa: ``W += (alpha / rank) * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)``.

peft's own update is the same products times ``alpha / r`` *always* (full LoKr factors too), so the
two disagree unless the scale is folded: the file multiplies peft's scale into the first factor and
writes ``alpha = rank``, which every reader of either convention turns into a scale of 1.

diffusers 0.42's ``load_lora_weights`` refuses such files ("all LoRA param names contain 'lora'"):
``soar-lite merge`` writes a diffusers transformer with the adapter fused in instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from soar_lite.config import LoraConfig
from soar_lite.errors import UserError

LYCORIS_TYPES = ("lokr", "loha")
# the factor of each type that carries the folded scale (the first present one)
_SCALED_FACTOR = {"lokr": ("lokr_w1", "lokr_w1_a"), "loha": ("hada_w1_a",)}
_FACTORS = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
}


def lycoris_config(cfg: LoraConfig, lora_config: Any) -> Any:
    """peft's LoKr/LoHa config for ``cfg``, on the modules the LoRA config ``lora_config`` targets.

    Taking targets and exclusions from the LoRA config keeps one place that decides them.
    ``init_weights=True`` starts the update at zero (LoKr: ``w1`` or ``w1_a`` = 0; LoHa:
    ``hada_w2_b`` = 0), so step 0 is the base model, as with LoRA."""
    from peft import LoHaConfig, LoKrConfig

    common = {
        "r": cfg.rank,
        "alpha": cfg.alpha,
        "target_modules": lora_config.target_modules,
        "exclude_modules": lora_config.exclude_modules,
        "init_weights": True,
    }
    if cfg.type == "lokr":
        return LoKrConfig(**common, decompose_factor=cfg.lokr_factor, decompose_both=cfg.lokr_decompose_both)
    return LoHaConfig(**common)


def kind_of(state: dict[str, Tensor]) -> str | None:
    """``lokr`` / ``loha`` when a file's tensors are LyCORIS factors, else None (a LoRA file)."""
    for kind, factors in _FACTORS.items():
        if any(key.rsplit(".", 1)[-1] in factors for key in state):
            return kind
    return None


def folded_state(raw: dict[str, Tensor], cfg: LoraConfig, strength: float = 1.0) -> dict[str, Tensor]:
    """peft's raw LoKr/LoHa tensors -> the file: ``transformer.`` keys, scale folded, ``alpha = rank``."""
    scale = strength * cfg.alpha / cfg.rank
    modules = _group(raw)
    out: dict[str, Tensor] = {}
    for module, factors in modules.items():
        scaled = next(name for name in _SCALED_FACTOR[cfg.type] if name in factors)
        for name, value in factors.items():
            value = value.detach().float()
            out[f"transformer.{module}.{name}"] = value * scale if name == scaled else value
        out[f"transformer.{module}.alpha"] = torch.tensor(float(cfg.rank))
    return out


def scaled(state: dict[str, Tensor], strength: float) -> dict[str, Tensor]:
    """A LoKr/LoHa file with ``strength`` folded into the factor that carries the scale."""
    kind = kind_of(state)
    if kind is None:
        raise UserError("no lokr_* / hada_* tensors in this file: not a LoKr or LoHa adapter")
    out = {}
    for module, factors in _group(state).items():
        first = next(name for name in _SCALED_FACTOR[kind] if name in factors)
        for name, value in factors.items():
            out[f"transformer.{module}.{name}"] = value.float() * strength if name == first else value.float()
    return out


def _group(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {factor: tensor}}`` from ``<module>.<factor>`` keys (``alpha`` kept as a factor)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        modules.setdefault(module.removeprefix("transformer."), {})[name] = value
    return modules


def file_deltas(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each module's weight update as a LyCORIS loader computes it from a file (the formulas in the
    module docstring), in fp32, shaped as the factors give it (the caller reshapes to the weight)."""
    kind = kind_of(state)
    if kind is None:
        raise UserError("no lokr_* / hada_* tensors in this file: not a LoKr or LoHa adapter")
    deltas = {}
    for module, f in _group(state).items():
        alpha = float(f["alpha"]) if "alpha" in f else None
        if any(name in f for name in ("lokr_t2", "hada_t1")):
            raise UserError(f"{module}: Tucker (conv) factors are not used by linear layers")
        if kind == "loha":
            rank = f["hada_w1_b"].shape[0]
            s = alpha / rank if alpha is not None else 1.0
            deltas[module] = (
                s
                * (f["hada_w1_a"].float() @ f["hada_w1_b"].float())
                * (f["hada_w2_a"].float() @ f["hada_w2_b"].float())
            )
            continue
        rank = None
        w = []
        for i in ("1", "2"):
            if f"lokr_w{i}" in f:
                w.append(f[f"lokr_w{i}"].float())
            else:
                rank = f[f"lokr_w{i}_b"].shape[0]
                w.append(f[f"lokr_w{i}_a"].float() @ f[f"lokr_w{i}_b"].float())
        s = alpha / rank if alpha is not None and rank is not None else 1.0
        deltas[module] = s * torch.kron(w[0], w[1])
    return deltas


def merge_into(transformer: torch.nn.Module, state: dict[str, Tensor], strength: float = 1.0) -> list[str]:
    """``W <- W + strength * delta`` for every module of a LoKr/LoHa file; returns the modules changed."""
    changed = []
    for module_name, delta in file_deltas(state).items():
        try:
            weight = transformer.get_submodule(module_name).weight
        except AttributeError:
            raise UserError(f"adapter module {module_name!r} is not in this model: wrong base?") from None
        if delta.numel() != weight.numel():
            raise UserError(
                f"adapter for {module_name} has {delta.numel()} values; the weight is {tuple(weight.shape)}"
            )
        with torch.no_grad():
            fused = weight.float() + strength * delta.reshape(weight.shape).to(weight.device)
            weight.copy_(fused.to(weight.dtype))
        changed.append(module_name)
    return changed


def attach(transformer: torch.nn.Module, state: dict[str, Tensor], name: str) -> None:
    """Load a LoKr/LoHa file as a named peft adapter (to switch adapters while sampling).

    The file's scale is folded, so the adapter is injected with ``alpha = rank`` (peft's scale 1);
    peft's shape settings are read back from the factors: the rank from any low-rank factor, the
    Kronecker factor from ``w1``'s shape (when it is not peft's automatic split)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lokr.layer import factorization

    kind = kind_of(state)
    if kind is None:
        raise UserError("no lokr_* / hada_* tensors in this file: not a LoKr or LoHa adapter")
    modules = _group(state)
    if kind == "loha":
        rank = next(iter(modules.values()))["hada_w1_b"].shape[0]
        settings = LoraConfig(type="loha", rank=rank, alpha=float(rank))
    else:
        ranks = [f[k].shape[0] for f in modules.values() for k in ("lokr_w1_b", "lokr_w2_b") if k in f]
        factor = -1
        for module, f in modules.items():
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            weight = transformer.get_submodule(module).weight
            auto = (factorization(weight.shape[0])[0], factorization(weight.shape[1])[0])
            if tuple(w1.shape) != auto:
                factor = w1.shape[0]
        # no low-rank factor anywhere: any rank at least the largest dimension keeps every factor full
        rank = ranks[0] if ranks else max(max(transformer.get_submodule(m).weight.shape) for m in modules)
        both = any("lokr_w1_a" in f for f in modules.values())
        settings = LoraConfig(
            type="lokr", rank=rank, alpha=float(rank), lokr_factor=factor, lokr_decompose_both=both
        )
    targets = _Targets(sorted(modules), None)
    inject_adapter_in_model(lycoris_config(settings, targets), transformer, adapter_name=name)
    raw = {f"{m}.{k}": v for m, f in modules.items() for k, v in f.items() if k != "alpha"}
    result = set_peft_model_state_dict(transformer, raw, adapter_name=name)
    if getattr(result, "unexpected_keys", []):
        raise UserError(f"adapter file does not fit this model: {result.unexpected_keys[:3]}")


class _Targets:
    """The two fields :func:`lycoris_config` reads from a LoRA config."""

    def __init__(self, target_modules: list[str], exclude_modules: list[str] | None) -> None:
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
