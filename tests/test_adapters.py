"""LoKr / LoHa files: what ComfyUI's loader would fuse equals peft's own merged weights, everywhere.

The loader side is written here from ComfyUI's published formulas (``comfy/weight_adapter/lokr.py``,
``loha.py``) and key map (``comfy/lora.py``: SD3's ``transformer.<diffusers module>`` names, q/k/v
as row slices of SAI's fused ``qkv``), not from soar_lite.adapters: for every adapted module,

* LoKr: ``kron(w1, w2)`` with ``w = lokr_w`` or ``lokr_w_a @ lokr_w_b``, times ``alpha / rank``
  (rank = the low-rank factor's inner size) if some factor is low-rank, else times 1;
* LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / w1_b.shape[0]``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from soar_lite import adapters, export
from soar_lite.config import LoraConfig
from soar_lite.errors import UserError
from soar_lite.lora import add_lora, folded_state, save_lora
from tests.test_export import ALL_TARGETS, sai_checkpoint, tiny_sd35_transformer

CASES = {
    "lokr low-rank w2": dict(type="lokr", rank=2, alpha=6.0),
    "lokr full factors": dict(type="lokr", rank=64, alpha=6.0),  # r >= dims/2: peft keeps both full
    "lokr both low-rank, factor 4": dict(
        type="lokr", rank=2, alpha=3.0, lokr_factor=4, lokr_decompose_both=True
    ),
    "loha": dict(type="loha", rank=3, alpha=9.0),
}


def comfy_delta(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One module's update as ComfyUI computes it from a file (see module docstring)."""
    alpha = float(factors["alpha"]) if "alpha" in factors else None
    if "hada_w1_a" in factors:
        m1 = factors["hada_w1_a"] @ factors["hada_w1_b"]
        m2 = factors["hada_w2_a"] @ factors["hada_w2_b"]
        return (alpha / factors["hada_w1_b"].shape[0] if alpha is not None else 1.0) * (m1 * m2)
    dim = None
    if "lokr_w1" in factors:
        w1 = factors["lokr_w1"]
    else:
        dim, w1 = factors["lokr_w1_b"].shape[0], factors["lokr_w1_a"] @ factors["lokr_w1_b"]
    if "lokr_w2" in factors:
        w2 = factors["lokr_w2"]
    else:
        dim, w2 = factors["lokr_w2_b"].shape[0], factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2)


def by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``transformer.<module>.<factor>`` keys -> {module: {factor: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        assert key.startswith("transformer."), key
        module, _, factor = key.removeprefix("transformer.").rpartition(".")
        out.setdefault(module, {})[factor] = value
    return out


def trained(case: dict, targets: list[str] | None = None, seed: int = 0):
    """A tiny SD3.5-style transformer with a randomised ("trained") adapter, and the adapter's config."""
    model = tiny_sd35_transformer()
    model.requires_grad_(False)
    cfg = LoraConfig(**case, **({"targets": targets} if targets else {}))
    params = add_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # LoKr's w1 starts at 0: move every factor
    return model, cfg


def peft_merged(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own merged weights: base + peft's get_delta_weight, for every adapted module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer().weight
            out[name] = base.detach() + module.get_delta_weight("default").detach()
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_comfyui_formula_on_the_file_gives_peft_merged_weights_per_module(case):
    model, cfg = trained(case)
    merged = peft_merged(model)
    state = folded_state(model, cfg)
    modules = by_module(state)
    assert modules.keys() == merged.keys() and len(modules) >= 14
    for module, factors in modules.items():
        assert float(factors["alpha"]) == cfg.rank
        base = model.get_submodule(module).get_base_layer().weight.detach()
        fused = base + comfy_delta(factors).reshape(base.shape)
        torch.testing.assert_close(fused, merged[module], rtol=1e-5, atol=1e-6, msg=module)
        assert not torch.allclose(fused, base, atol=1e-4), module


def test_unfolded_factors_would_be_read_at_the_wrong_strength():
    """Negative control: peft's raw factors with alpha in the file do not give peft's weights in ComfyUI
    when LoKr keeps both factors full (ComfyUI then ignores alpha; peft still applies alpha/r)."""
    model, cfg = trained(CASES["lokr full factors"])
    raw = {f"transformer.{k}": v for k, v in export_raw(model).items()}
    module = "transformer_blocks.0.attn.to_q"
    factors = by_module(raw)[module] | {"alpha": torch.tensor(cfg.alpha)}
    base = model.get_submodule(module).get_base_layer().weight.detach()
    wrong = base + comfy_delta(factors).reshape(base.shape)
    assert not torch.allclose(wrong, peft_merged(model)[module], atol=1e-3)


def export_raw(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from soar_lite.lora import adapter_state

    return adapter_state(model)


@pytest.mark.parametrize("case", [CASES["lokr low-rank w2"], CASES["loha"]], ids=["lokr", "loha"])
def test_comfyui_path_through_sai_qkv_slices_equals_peft_merge_everywhere(case):
    """Every mappable module, context branch and attn2 included: the file fused into the SAI layout
    the way ComfyUI's SD3 key map addresses it (q/k/v = rows 0/1/2 of ``qkv``), converted back with
    diffusers' converter, equals peft's merged transformer in every weight."""
    model, cfg = trained(case, targets=ALL_TARGETS)
    merged = peft_merged(model)
    base_sd = {k: v.detach().clone() for k, v in tiny_sd35_transformer().state_dict().items()}
    sai = sai_checkpoint(base_sd, 2)
    for module, factors in by_module(folded_state(model, cfg)).items():
        target, slot, n = export._diffusers_to_sai(module)
        key = f"{target}.weight"
        rows = sai[key].shape[0] // n
        if target.endswith(("final_layer.adaLN_modulation.1",)) or (
            target.endswith("context_block.adaLN_modulation.1") and sai[key].shape[0] == 2 * sai[key].shape[1]
        ):
            delta = export.swap_halves(comfy_delta(factors))  # these rows are (shift, scale) in SAI
        else:
            delta = comfy_delta(factors)
        sai[key] = sai[key].clone()
        sai[key][slot * rows : (slot + 1) * rows] += delta.reshape(rows, -1)
    got = convert_sd3_transformer_checkpoint_to_diffusers(sai)
    assert len(merged) >= 30
    for module, weight in merged.items():
        torch.testing.assert_close(got[f"{module}.weight"], weight, rtol=1e-5, atol=1e-6, msg=module)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_saved_file_attaches_back_as_a_peft_adapter_with_the_same_output(case, tmp_path):
    from safetensors.torch import load_file

    model, cfg = trained(case, targets=ALL_TARGETS)
    path = save_lora(model, cfg, tmp_path, {})
    fresh = tiny_sd35_transformer()
    fresh.requires_grad_(False)
    adapters.attach(fresh, load_file(str(path)), "x")
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**x)[0], model(**x)[0], rtol=1e-4, atol=1e-5)


def test_merge_into_equals_peft_merge_and_strength_scales_the_update():
    model, cfg = trained(CASES["loha"])
    state = folded_state(model, cfg)
    merged = peft_merged(model)
    base = tiny_sd35_transformer()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    changed = export.merge_into(base, state, strength=0.5)
    assert sorted(changed) == sorted(merged)
    for module in changed:
        w0 = before[f"{module}.weight"]
        torch.testing.assert_close(
            base.get_submodule(module).weight, w0 + 0.5 * (merged[module] - w0), rtol=1e-5, atol=1e-6
        )


def _inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 16, 16, 16, generator=g),
        timestep=torch.tensor([400.0]),
        encoder_hidden_states=torch.randn(1, 6, 64, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        return_dict=False,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.type=lokr", "lora.use_rslora=true"], "use_rslora scales LoRA by alpha/sqrt"),
        (["lora.type=loha", "lora.dropout=0.1"], "peft's loha has none"),
        (["lora.type=lokr", "lora.use_dora=true"], "cannot be combined with lora.type=lokr"),
        (["lora.type=lokr", "optim.loraplus_ratio=16"], "lora.type=lokr has none"),
        (["lora.type=loka"], "choose one of: lora, dora, lokr, loha"),
        (["lora.lokr_factor=0"], "must be -1"),
    ],
)
def test_refused_combinations_are_one_line_errors(overrides, message):
    from soar_lite.config import build_config

    with pytest.raises(UserError, match=message) as info:
        build_config({}, overrides)
    assert "\n" not in str(info.value)


def test_dora_has_one_spelling():
    from soar_lite.config import build_config

    assert build_config({}, ["lora.type=dora"]).lora.use_dora is True
    assert build_config({}, ["lora.use_dora=true"]).lora.type == "dora"


def test_export_writes_comfyui_with_strength_and_refuses_kohya_and_diffusers(tmp_path):
    from safetensors.torch import load_file

    model, cfg = trained(CASES["lokr low-rank w2"])
    path = save_lora(model, cfg, tmp_path / "run", {})
    out = export.export_lora(path, "comfyui", tmp_path / "c.safetensors", strength=0.5)
    module = "transformer_blocks.0.attn.to_k"
    full, half = by_module(load_file(str(path)))[module], by_module(load_file(str(out)))[module]
    torch.testing.assert_close(comfy_delta(half), 0.5 * comfy_delta(full))
    with pytest.raises(UserError, match="LoKr adapter: the SAI layout fuses q/k/v"):
        export.export_lora(path, "kohya", tmp_path / "k.safetensors")
    with pytest.raises(UserError, match="diffusers' load_lora_weights reads only lora_A/lora_B"):
        export.export_lora(path, "diffusers", tmp_path / "d.safetensors")


def test_diffusers_refuses_the_file_as_the_readme_says(tiny_model_dir, tmp_path):
    """Measured: diffusers' SD3 loader does not read LoKr/LoHa keys (the README points to merge)."""
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    pipe = load_tiny_pipeline(tiny_model_dir)
    pipe.transformer.requires_grad_(False)
    cfg = LoraConfig(type="loha", rank=2, alpha=2.0)
    add_lora(pipe.transformer, cfg)
    path = save_lora(pipe.transformer, cfg, tmp_path, {})
    with pytest.raises(ValueError, match="contain `'lora'` substring"):
        load_tiny_pipeline(tiny_model_dir).load_lora_weights(str(path))


def test_sampling_attaches_a_lokr_file_at_a_strength_and_switches_it_off(tmp_path):
    """``sample`` / ``compare`` load LoKr/LoHa through peft (diffusers cannot): strength 0.5 gives the
    base with half the update merged; ``disable_lora`` gives the base back."""
    from soar_lite.sample import attach_loras

    model, cfg = trained(CASES["lokr low-rank w2"], targets=ALL_TARGETS)
    path = save_lora(model, cfg, tmp_path, {})
    x = _inputs()
    half = tiny_sd35_transformer()
    export.merge_into(half, folded_state(model, cfg), strength=0.5)
    live = tiny_sd35_transformer()
    live.requires_grad_(False)
    with torch.no_grad():
        base = live(**x)[0]
        assert attach_loras(live, [(path, 0.5)]) == ["lora0"]
        torch.testing.assert_close(live(**x)[0], half(**x)[0], rtol=1e-4, atol=1e-5)
        live.disable_lora()
        torch.testing.assert_close(live(**x)[0], base)


def test_merge_cli_path_writes_a_diffusers_transformer_with_the_lokr_fused_in(tiny_model_dir, tmp_path):
    """What diffusers users do with a LoKr/LoHa file: ``soar-lite merge``, then ``from_pretrained``."""
    from diffusers import SD3Transformer2DModel

    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    model = load_tiny_pipeline(tiny_model_dir).transformer
    model.requires_grad_(False)
    cfg = LoraConfig(type="lokr", rank=2, alpha=5.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in add_lora(model, cfg):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    want = peft_merged(model)
    path = save_lora(model, cfg, tmp_path / "run", {})
    out = export.merge_lora(str(tiny_model_dir), [(path, 1.0)], tmp_path / "merged")
    merged = SD3Transformer2DModel.from_pretrained(out)
    for module, weight in want.items():
        torch.testing.assert_close(merged.get_submodule(module).weight, weight, rtol=1e-5, atol=1e-6)
