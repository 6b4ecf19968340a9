"""LoRA interop: the kohya / SAI-native layout, reading it back, and merging a LoRA into the base.

soar-lite's own file (``lora.py``) is the diffusers layout with the scale folded in, which diffusers
and ComfyUI both load to the same weights. Some tools want the layout of Stability's own SD3
checkpoints instead, as kohya's sd-scripts writes it: ``lora_unet_<SAI module with _>`` names,
``lora_down`` / ``lora_up`` / ``alpha``, one fused ``qkv`` projection per attention, and the
adaptive norms whose output halves are ordered (shift, scale) where diffusers has (scale, shift).
The mapping below is the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``
(the tests check it against that function), so it covers SD3 and SD3.5 (``attn2``, qk-norm). FLUX.1
gets kohya's FLUX names (BFL's ``double_blocks`` / ``single_blocks``) the same way: fused ``qkv``
and, in the single blocks, ``linear1`` = q, k, v and the MLP input.

Fusing q, k and v: with per-projection adapters (A_q, B_q), ... the fused adapter is
``down = [A_q; A_k; A_v]`` and ``up = blockdiag(B_q, B_k, B_v)``, so ``up @ down`` stacks
``B_q A_q``, ``B_k A_k``, ``B_v A_v``: the same update, with rank = the sum of ranks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from soar_lite import adapters
from soar_lite.errors import UserError
from soar_lite.lora import LORA_FILE, atomic_save, read_lora

KOHYA_PREFIX = "lora_unet_"
KIND_NAMES = {"lokr": "LoKr", "loha": "LoHa"}
LYCORIS_REFUSALS = {
    "kohya": "this is a {kind} adapter: the SAI layout fuses q/k/v into one qkv weight and a {kind} of three "
    "projections is not a {kind} of their stack; use --format comfyui (ComfyUI reads it per projection)",
    "diffusers": "this is a {kind} adapter: diffusers' load_lora_weights reads only lora_A/lora_B keys; "
    "fuse it into the base with `soar-lite merge` and load that transformer instead",
}
FORMATS = ("kohya", "comfyui", "diffusers")

# SAI module (inside joint_blocks.<i>.) -> its diffusers module(s) (inside transformer_blocks.<i>.)
BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
}
# SAI module -> diffusers module, outside the blocks
TOP_MODULES: dict[str, tuple[str, ...]] = {
    "x_embedder.proj": ("pos_embed.proj",),
    "context_embedder": ("context_embedder",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
# FLUX.1: BFL module (inside double_blocks.<i>. / single_blocks.<i>.) -> its diffusers modules (inside
# transformer_blocks.<i>. / single_transformer_blocks.<i>.), the inverse of diffusers'
# convert_flux_transformer_checkpoint_to_diffusers; kohya names are lora_unet_<BFL module with _>.
FLUX_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
# linear1 fuses q, k, v and the MLP input (4 x hidden rows); linear2 is the block's output projection
FLUX_SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
FLUX_MLP_RATIO = 4
_FLUX_DIFFUSERS = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_FLUX_KOHYA = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")
_BLOCK_DIFFUSERS = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_BLOCK_KOHYA = re.compile(r"^joint_blocks_(\d+)_(.+)$")


def _diffusers_to_sai(module: str) -> tuple[str, int, int]:
    """diffusers module -> (SAI module, slot in a fused projection, number of slots)."""
    match = _BLOCK_DIFFUSERS.match(module)
    table, prefix, rest = (
        (BLOCK_MODULES, f"joint_blocks.{match[1]}.", match[2]) if match else (TOP_MODULES, "", module)
    )
    for sai, parts in table.items():
        if rest in parts:
            return prefix + sai, parts.index(rest), len(parts)
    raise UserError(
        f"LoRA module {module!r} has no SD3 single-file (SAI) equivalent; cannot export it to kohya"
    )


def _kohya_to_sai(name: str) -> tuple[str, tuple[str, ...]]:
    """``joint_blocks_3_x_block_attn_qkv`` -> (``joint_blocks.3.x_block.attn.qkv``, its diffusers modules)."""
    match = _BLOCK_KOHYA.match(name)
    table, sai_prefix, diff_prefix, rest = (
        (BLOCK_MODULES, f"joint_blocks.{match[1]}.", f"transformer_blocks.{match[1]}.", match[2])
        if match
        else (TOP_MODULES, "", "", name)
    )
    for sai, parts in table.items():
        if sai.replace(".", "_") == rest:
            return sai_prefix + sai, tuple(diff_prefix + p for p in parts)
    raise UserError(f"kohya LoRA module lora_unet_{name} is not an SD3 transformer module")


def _needs_swap(sai: str, up: Tensor, down: Tensor) -> bool:
    """The norms whose (shift, scale) halves diffusers stores as (scale, shift).

    The final layer's always; a block's context norm only in the last block, whose context branch
    is "pre-only": its modulation has 2 x hidden outputs (the others have 6 x hidden).
    """
    if sai == "final_layer.adaLN_modulation.1":
        return True
    return sai.endswith("context_block.adaLN_modulation.1") and up.shape[0] == 2 * down.shape[1]


def swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) along the output rows; its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def adapter_pairs(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """diffusers-layout tensors -> {module: (A, B)} (``transformer.`` stripped), with a clear error if odd."""
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in state:
            raise UserError(f"LoRA file has {key} without {b_key}")
        pairs[module.removeprefix("transformer.")] = (state[key], state[b_key])
    if not pairs:
        raise UserError("no lora_A / lora_B pairs in this file (is it a diffusers-layout LoRA?)")
    return pairs


def is_flux_lora(state: dict[str, Tensor]) -> bool:
    """A FLUX.1 LoRA (diffusers or kohya names): FLUX alone has single-stream blocks."""
    return any(
        ".single_transformer_blocks." in k or "single_blocks_" in k or "double_blocks_" in k for k in state
    )


def to_kohya_flux(state: dict[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
    """diffusers FLUX layout -> kohya's FLUX layout (BFL names, fused qkv / linear1, ``alpha = rank``).

    The fused adapters are exact (see the module docstring); linear1's MLP rows are zero unless
    ``proj_mlp`` was adapted. Its row split is 3 x hidden + 4 x hidden (FLUX.1's MLP ratio)."""
    fused: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    names: dict[str, tuple[str, ...]] = {}
    for module, (a, b) in adapter_pairs(state).items():
        match = _FLUX_DIFFUSERS.match(module)
        table = FLUX_SINGLE if match and match[1] == "single_transformer_blocks" else FLUX_DOUBLE
        kind = "single_blocks" if table is FLUX_SINGLE else "double_blocks"
        found = [(bfl, parts) for bfl, parts in table.items() if match and match[3] in parts]
        if not found:
            raise UserError(f"LoRA module {module!r} has no kohya FLUX equivalent; cannot export it to kohya")
        bfl, parts = found[0]
        key = f"{kind}.{match[2]}.{bfl}"
        fused.setdefault(key, {})[parts.index(match[3])] = (a.float(), b.float() * strength)
        names[key] = parts
    out: dict[str, Tensor] = {}
    for key, parts in sorted(fused.items()):
        down, up = _fuse_rows(parts, _flux_rows(names[key], parts))
        name = KOHYA_PREFIX + key.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def _flux_rows(modules: tuple[str, ...], parts: dict[int, tuple[Tensor, Tensor]]) -> list[int]:
    """Output rows of each slot of a fused FLUX module, from the adapters present."""
    if len(modules) == 1:
        return [next(iter(parts.values()))[1].shape[0]]
    if len(modules) == 3:
        rows = next(iter(parts.values()))[1].shape[0]
        return [rows] * 3
    # linear1: q, k, v of hidden rows each, then the MLP input of FLUX_MLP_RATIO x hidden
    slot, (_, b) = next(iter(parts.items()))
    hidden = b.shape[0] // FLUX_MLP_RATIO if slot == 3 else b.shape[0]
    return [hidden, hidden, hidden, FLUX_MLP_RATIO * hidden]


def _fuse_rows(parts: dict[int, tuple[Tensor, Tensor]], rows: list[int]) -> tuple[Tensor, Tensor]:
    """Stacked downs and a block-diagonal up with ``rows[i]`` output rows for slot ``i``."""
    ranks = [parts[i][0].shape[0] if i in parts else 0 for i in range(len(rows))]
    down = torch.cat([parts[i][0] for i in range(len(rows)) if i in parts], dim=0)
    up = torch.zeros(sum(rows), sum(ranks), dtype=down.dtype)
    row = col = 0
    for i, n in enumerate(rows):
        if i in parts:
            up[row : row + n, col : col + ranks[i]] = parts[i][1]
            col += ranks[i]
        row += n
    return down, up


def from_kohya_flux(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """kohya's FLUX layout -> diffusers layout (alpha/rank folded): each fused module's rows go to
    its diffusers projections with the shared down; all-zero rows give no adapter."""
    out: dict[str, Tensor] = {}
    for key in state:
        if not (key.startswith(KOHYA_PREFIX) and key.endswith(".lora_down.weight")):
            continue
        name = key[len(KOHYA_PREFIX) : -len(".lora_down.weight")]
        match = _FLUX_KOHYA.match(name)
        table = FLUX_SINGLE if match and match[1] == "single_blocks" else FLUX_DOUBLE
        found = [(bfl, parts) for bfl, parts in table.items() if match and bfl.replace(".", "_") == match[3]]
        if not found:
            raise UserError(f"kohya LoRA module lora_unet_{name} is not a FLUX.1 block module this reads")
        _, modules = found[0]
        down = state[key].float()
        up = state[f"{KOHYA_PREFIX}{name}.lora_up.weight"].float()
        alpha = state.get(f"{KOHYA_PREFIX}{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        if len(modules) == 4:
            hidden = up.shape[0] // (3 + FLUX_MLP_RATIO)
            chunks = up.split([hidden, hidden, hidden, FLUX_MLP_RATIO * hidden], dim=0)
        else:
            chunks = up.chunk(len(modules), dim=0)
        prefix = "single_transformer_blocks" if table is FLUX_SINGLE else "transformer_blocks"
        for module, rows in zip(modules, chunks, strict=True):
            if len(modules) > 1 and not rows.any():
                continue
            out[f"transformer.{prefix}.{match[2]}.{module}.lora_A.weight"] = down.clone()
            out[f"transformer.{prefix}.{match[2]}.{module}.lora_B.weight"] = (rows * scale).contiguous()
    if not out:
        raise UserError("no lora_unet_*.lora_down.weight keys: not a kohya FLUX LoRA")
    return out


def to_kohya(state: dict[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
    """diffusers layout (scale folded) -> kohya/SAI layout, ``alpha = rank`` (scale 1, strength folded)."""
    fused: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    slots: dict[str, int] = {}
    for module, (a, b) in adapter_pairs(state).items():
        sai, slot, n = _diffusers_to_sai(module)
        fused.setdefault(sai, {})[slot] = (a.float(), b.float() * strength)
        slots[sai] = n
    out: dict[str, Tensor] = {}
    for sai, parts in sorted(fused.items()):
        down, up = _fuse(parts, slots[sai])
        if _needs_swap(sai, up, down):
            up = swap_halves(up)
        name = KOHYA_PREFIX + sai.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def _fuse(parts: dict[int, tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
    """Stack the downs, block-diagonal ups (zero rows for a projection without an adapter)."""
    if n == 1:
        return parts[0]
    rows = next(iter(parts.values()))[1].shape[0]
    ranks = [parts[i][0].shape[0] if i in parts else 0 for i in range(n)]
    down = torch.cat([parts[i][0] for i in range(n) if i in parts], dim=0)
    up = torch.zeros(n * rows, sum(ranks), dtype=down.dtype)
    col = 0
    for i in range(n):
        if i in parts:
            up[i * rows : (i + 1) * rows, col : col + ranks[i]] = parts[i][1]
            col += ranks[i]
    return down, up


def from_kohya(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """kohya/SAI layout -> diffusers layout (``transformer.`` keys, alpha/rank folded into ``lora_B``).

    A fused ``qkv`` adapter becomes three adapters sharing its ``down``; each takes its rows of
    ``up``, so every projection gets exactly the update the fused one applied. Rows that are all
    zero (a projection the fused adapter leaves alone) give no adapter.
    """
    out: dict[str, Tensor] = {}
    for key in state:
        if not (key.startswith(KOHYA_PREFIX) and key.endswith(".lora_down.weight")):
            continue
        name = key[len(KOHYA_PREFIX) : -len(".lora_down.weight")]
        down = state[key].float()
        up = state[f"{KOHYA_PREFIX}{name}.lora_up.weight"].float()
        alpha = state.get(f"{KOHYA_PREFIX}{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        sai, modules = _kohya_to_sai(name)
        if _needs_swap(sai, up, down):
            up = swap_halves(up)
        for module, rows in zip(modules, up.chunk(len(modules), dim=0), strict=True):
            if len(modules) > 1 and not rows.any():
                continue
            out[f"transformer.{module}.lora_A.weight"] = down.clone()
            out[f"transformer.{module}.lora_B.weight"] = (rows * scale).contiguous()
    if not out:
        raise UserError("no lora_unet_*.lora_down.weight keys: not a kohya SD3 LoRA")
    return out


def read_any_lora(path: str | Path) -> dict[str, Tensor]:
    """A LoRA file (or run folder) in the diffusers layout, converting a kohya/SAI file on the way."""
    state = read_lora(path)
    if any(k.startswith(KOHYA_PREFIX) for k in state):
        return from_kohya_flux(state) if is_flux_lora(state) else from_kohya(state)
    if all(k.startswith("transformer.") for k in state):
        return state
    example = next(iter(state), "(empty file)")
    raise UserError(
        f"unrecognised LoRA layout (first key {example!r}); expected transformer.* or lora_unet_*"
    )


def export_lora(lora: str | Path, fmt: str, output: str | Path, *, strength: float = 1.0) -> Path:
    """Write ``lora`` in ``fmt`` at ``output`` (a file, or a folder to put the file in).

    ``kohya``: SAI-native names, fused qkv, ``alpha`` (ComfyUI and kohya-based tools read it).
    ``comfyui`` / ``diffusers``: the diffusers layout, which ComfyUI's SD3 loader already maps
    (context branch and ``attn2`` included): the same file, with ``strength`` folded in.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not valid; choose one of: {', '.join(FORMATS)}")
    state = read_any_lora(lora)
    kind = adapters.kind_of(state)
    if kind and fmt != "comfyui":
        raise UserError(LYCORIS_REFUSALS[fmt].format(kind=KIND_NAMES[kind]))
    if any(".lora_magnitude_vector" in key for key in state):
        if fmt != "diffusers":
            raise UserError(
                "this is a DoRA LoRA: kohya tools and ComfyUI normalise DoRA weights differently from "
                "peft/diffusers, so no exact conversion exists; load it in diffusers, or fuse it into the "
                "base with `soar-lite merge`"
            )
        if strength != 1.0:
            raise UserError("a DoRA LoRA's strength is not a weight scale: set it at load time")
    from soar_lite.lora import training_note

    # which family: soar-lite's note says; else only FLUX has single-stream blocks (a double-block-only
    # FLUX LoRA without a note reads as SD3: its module names are SD3's too)
    family = training_note(lora).get("family")
    flux = family == "flux" or is_flux_lora(state)
    if fmt == "kohya" and family == "qwen":
        raise UserError(
            "no kohya layout is written for Qwen-Image: ComfyUI maps the diffusers names of Qwen-Image "
            "(transformer.<module>) itself, so use --format comfyui (or the file as it is)"
        )
    if fmt == "kohya":
        tensors = to_kohya_flux(state, strength) if flux else to_kohya(state, strength)
    elif kind:  # ComfyUI reads soar-lite's LyCORIS file as it is: only the strength to fold
        tensors = adapters.scaled(state, strength)
    else:
        tensors = {k: v.float() * strength if ".lora_B." in k else v.float() for k, v in state.items()}
    output = Path(output)
    if output.is_dir() or not output.suffix:
        output = output / f"{Path(LORA_FILE).stem}_{fmt}.safetensors"
    source = Path(lora) / LORA_FILE if Path(lora).is_dir() else Path(lora)
    if output.resolve() == source.resolve():
        raise UserError(f"--output {output} is the LoRA being exported: choose another file")
    output.parent.mkdir(parents=True, exist_ok=True)
    note = {"source": str(lora), "format": fmt, "strength": strength}
    metadata = {"format": "pt", "soar_lite_export": json.dumps(note)}
    if fmt == "kohya" and flux:
        metadata.update(ss_network_module="networks.lora_flux", ss_base_model_version="flux1")
    elif fmt == "kohya":
        metadata.update(ss_network_module="networks.lora_sd3", ss_base_model_version="sd3")
    atomic_save(tensors, output, metadata)
    return output


# ---------------------------------------------------------------- merge


def merge_into(transformer: torch.nn.Module, state: dict[str, Tensor], strength: float = 1.0) -> list[str]:
    """``W <- W + strength * B @ A`` for every adapter, computed in fp32; returns the modules changed.
    A LoKr/LoHa file is fused by its own products (:func:`soar_lite.adapters.merge_into`)."""
    if adapters.kind_of(state):
        return adapters.merge_into(transformer, state, strength)
    changed = []
    for module_name, (a, b) in adapter_pairs(state).items():
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            raise UserError(f"LoRA module {module_name!r} is not in this model: wrong base?") from None
        weight = module.weight
        delta = (b.float().flatten(1) @ a.float().flatten(1)) * strength
        if delta.numel() != weight.numel():
            raise UserError(
                f"LoRA for {module_name} has shape {tuple(delta.shape)}, the model's is {tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight.copy_((weight.float() + delta.reshape(weight.shape).to(weight.device)).to(weight.dtype))
        changed.append(module_name)
    return changed


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the transformer's weights are stored in (merge keeps it), fp32 if unknown."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_slice(key)
                return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
                    tensor.get_dtype(), torch.float32
                )
    return torch.float32


def merge_lora(
    model: str,
    loras: Iterable[tuple[str | Path, float]],
    output: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the base transformer with the LoRA(s) fused in, as a diffusers folder (``from_pretrained``-able).

    The merged weights keep the base's stored dtype. Load it with
    ``SD3Transformer2DModel.from_pretrained(output)`` (``FluxTransformer2DModel`` for FLUX.1) and pass
    it to the pipeline as ``transformer=``.
    """
    from soar_lite import families
    from soar_lite.base_model import resolve_model

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output} is not empty: pass --overwrite or another --output")
    model_path = resolve_model(model)
    folder = Path(model_path) / "transformer"
    dtype = _stored_dtype(folder) if folder.is_dir() else torch.float32
    try:
        cls = families.family_class(families.detect_family(model_path)).transformer_class
        transformer = cls.from_pretrained(model_path, subfolder="transformer", dtype=dtype)
    except OSError as exc:
        raise UserError(
            f"cannot load the transformer of {model_path!r}: {str(exc).splitlines()[0]}"
        ) from None
    notes = []
    for lora, strength in loras:
        merge_into(transformer, read_any_lora(lora), strength)
        notes.append({"lora": str(lora), "strength": strength})
    transformer.save_pretrained(output)
    record = {"base_model": model_path, "merged": notes}
    (output / "soar_lite_merge.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return output
