"""The memory planner: offline configs, coefficients that match measurement, presets that state it."""

from __future__ import annotations

import re

import pytest
import torch

from soar_lite import config
from soar_lite.errors import UserError
from soar_lite.plan import (
    _count,
    activation_values,
    encoder_params,
    plan,
    plan_cache_stage,
    suggest,
    tier_of,
    transformer_config,
)


def _measured_saved_bytes(
    dual: bool, image_side: int, text_tokens: int, dora: bool = False, kind: str = "lora"
) -> tuple[int, dict]:
    from soar_lite.bench.step import SavedTensorMeter
    from soar_lite.config import LoraConfig
    from soar_lite.lora import add_lora
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    model = tiny_sd3_transformer(
        0,
        sample_size=image_side,
        num_layers=3,
        pos_embed_max_size=64,
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1) if dual else (),
    )
    model.requires_grad_(False)
    add_lora(model, LoraConfig(type=kind, rank=8, alpha=8.0, use_dora=dora))
    meter = SavedTensorMeter(model.parameters())
    with meter.hooks():
        out = model(
            hidden_states=torch.randn(1, 16, image_side, image_side),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, text_tokens, 64),
            pooled_projections=torch.randn(1, 64),
            return_dict=False,
        )[0]
        out.square().mean().backward()
    return meter.peak, dict(model.config)


@pytest.mark.parametrize(("dual", "side", "text"), [(False, 16, 16), (False, 32, 48), (True, 32, 16)])
def test_activation_coefficients_match_a_fresh_measurement(dual, side, text):
    """The planner's per-token coefficients predict saved-activation bytes of unseen shapes within 15 %."""
    measured, kwargs = _measured_saved_bytes(dual, side, text)
    predicted = activation_values(kwargs, resolution=side * 8, text_tokens=text, checkpointing=False) * 4
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


@pytest.mark.parametrize(("dual", "side", "text"), [(False, 16, 16), (True, 32, 48)])
def test_dora_factor_matches_a_fresh_measurement(dual, side, text):
    measured, kwargs = _measured_saved_bytes(dual, side, text, dora=True)
    predicted = (
        activation_values(kwargs, resolution=side * 8, text_tokens=text, checkpointing=False, dora=True) * 4
    )
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
@pytest.mark.parametrize(("dual", "side", "text"), [(False, 16, 16), (True, 32, 48)])
def test_lokr_and_loha_saved_updates_match_a_fresh_measurement(kind, dual, side, text):
    """LoRA's activations plus one full-size update per adapted linear (not the first block's
    input projections) predict LoKr's and LoHa's saved bytes within 15 %, three times closer than
    LoRA's activations alone."""
    from soar_lite.config import LoraConfig
    from soar_lite.plan import lycoris_counts

    measured, kwargs = _measured_saved_bytes(dual, side, text, kind=kind)
    _, deltas, _ = lycoris_counts(kwargs, LoraConfig(type=kind, rank=8, alpha=8.0))
    lora_part = activation_values(kwargs, resolution=side * 8, text_tokens=text, checkpointing=False) * 4
    assert abs(lora_part + deltas * 4 - measured) / measured < 0.15, (lora_part, deltas * 4, measured)
    assert abs(lora_part + deltas * 4 - measured) < abs(lora_part - measured) / 3  # the term is needed


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_parameter_count_is_the_live_adapters(kind):
    from soar_lite.config import LoraConfig
    from soar_lite.lora import add_lora
    from soar_lite.plan import lycoris_counts
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    cfg = LoraConfig(type=kind, rank=4, alpha=4.0, lokr_factor=4)
    model = tiny_sd3_transformer(0)
    model.requires_grad_(False)
    live = sum(p.numel() for p in add_lora(model, cfg))
    params, every, one_block = lycoris_counts(dict(model.config), cfg)
    assert params == live and 0 < one_block < every


def test_planner_labels_each_adapter_and_optimizer_and_counts_prodigy_states():
    adamw = plan(config.load_config("24gb", ["optimizer=adamw"]), "sd3.5-large", 24)
    prodigy = plan(config.load_config("24gb", ["optimizer=prodigy", "lr=1"]), "sd3.5-large", 24)
    (a,) = [v for k, v in adamw.parts.items() if k.startswith("LoRA r32")]
    (p,) = [v for k, v in prodigy.parts.items() if k.startswith("LoRA r32") and "prodigy" in k]
    assert p == pytest.approx(a * (4 + 4 + 16) / (4 + 4 + 8))
    lokr = plan(config.load_config("24gb", ["lora.type=lokr", "quant=int8"]), "sd3.5-large", 24)  # not NF4
    assert any(k.startswith("LoKr r32") for k in lokr.parts)
    assert any("LoKr full-size updates" in k and v > 0 for k, v in lokr.parts.items())


def test_shipped_configs_count_the_public_parameter_totals():
    for name, billions in (("sd3.5-medium", 2.24), ("sd3.5-large", 8.06)):
        linear, other, _ = _count(transformer_config(name), ["to_q"], 16)
        assert abs((linear + other) / 1e9 - billions) < 0.02


@pytest.mark.parametrize("name", ["8gb", "12gb", "16gb", "24gb", "48gb"])
def test_every_gpu_preset_states_the_planner_estimate_and_fits_its_tier(name):
    cfg = config.load_config(name)
    result = plan(cfg, cfg.model.path, tier_of(name))
    stated = re.search(r"Planner estimate .*: ([\d.]+) GiB", config.preset_header(name))
    assert stated and float(stated.group(1)) == round(result.total, 1)
    assert result.fits
    header = config.preset_header(name)
    cache = re.search(r"Cache stage: encoder_offload=auto -> (\w+) .*: ([\d.]+) GiB GPU", header)
    assert cache and cache.group(1) == result.cache.mode
    assert float(cache.group(2)) == round(result.cache.gpu_peak_gb, 1) < tier_of(name) * 0.95


def test_checkpointing_and_quantization_lower_the_estimate():
    cfg = config.load_config("16gb")
    base = plan(cfg, "sd3.5-medium").total
    no_ckpt = config.load_config("16gb", ["gradient_checkpointing=false"])
    nf4 = config.load_config("16gb", ["quant=nf4"])
    assert plan(no_ckpt, "sd3.5-medium").total > base > plan(nf4, "sd3.5-medium").total


def test_soar_adds_almost_nothing_over_sft_for_any_k():
    sft = plan(config.load_config("16gb", ["objective=sft"]), "sd3.5-medium").total
    soar = plan(config.load_config("16gb", ["trajectory_length=12"]), "sd3.5-medium").total
    assert 0 <= soar - sft < 0.05


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no transformer config"):
        transformer_config(str(tmp_path))


@pytest.mark.parametrize(("tier", "mode"), [(8, "sequential"), (12, "model"), (24, "none")])
def test_cache_stage_offloads_sd35_encoders_on_small_cards_and_fits(tier, mode):
    stage = plan_cache_stage("sd3.5-medium", "bfloat16", tier)
    assert stage.mode == mode
    assert stage.gpu_peak_gb < tier * 0.95  # the cache stage itself fits the card
    assert 10.0 < stage.ram_gb < 14.0  # ~11 GB of bf16 encoders load into system RAM first


def test_encoder_params_of_a_folder_are_read_from_safetensors_headers(tiny_model_dir):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    pipe = load_tiny_pipeline(tiny_model_dir)
    counts, vae = encoder_params(str(tiny_model_dir))
    assert counts == {
        "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "text_encoder_2": sum(p.numel() for p in pipe.text_encoder_2.parameters()),
    }
    assert vae == sum(p.numel() for p in pipe.vae.parameters())


def test_suggest_finds_the_cheapest_changes_that_fit():
    assert plan(config.load_config("16gb"), "sd3.5-large", 16).fits is False
    changes, fitted = suggest("16gb", [], "sd3.5-large", 16)
    assert changes == ["quant=int8"] and fitted.fits
    changes, fitted = suggest("48gb", [], "sd3.5-large", 6)
    assert fitted.fits and fitted.total <= 6 * 0.95
    assert "quant=nf4" in changes and "gradient_checkpointing=true" in changes
    # block swap (time, not quality) before any resolution change
    assert any(c.startswith("swap_blocks=") for c in changes) and not any("resolution" in c for c in changes)
    # loading block by block, even 2 GB fits with every block swapped at 512 px; 1 GB cannot hold the
    # CUDA context, the VAE decoder and the two blocks in flight
    changes, fitted = suggest("48gb", [], "sd3.5-large", 2)
    assert "swap_blocks=38" in changes and fitted.swap.load_gb <= 2 * 0.95
    assert suggest("48gb", [], "sd3.5-large", 1) is None


def test_auto_preset_takes_the_largest_tier_not_above_the_card():
    from soar_lite.plan import fit

    assert fit("auto", [], 10)[:2] == ("8gb", [])
    assert fit("auto", [], 24)[:2] == ("24gb", [])
    preset, overrides, notes = fit("auto", [], 100)
    assert (preset, overrides) == ("48gb", []) and notes[0] == "--preset auto: a 100 GB GPU -> preset 48gb"


def test_vram_applies_the_planners_changes_only_when_needed():
    from soar_lite.plan import fit

    preset, overrides, notes = fit("16gb", ["model.path=sd3.5-large"], 16)
    assert overrides == ["model.path=sd3.5-large", "quant=int8"] and "would not fit 16 GB" in notes[-1]
    assert plan(config.load_config(preset, overrides), "sd3.5-large", 16).fits
    assert fit("16gb", [], 16)[1] == []  # Medium bf16 fits as set
    assert "no offline config" in fit("16gb", ["model.path=someone/else"], 16)[2][-1]
    with pytest.raises(UserError, match="does not fit 1 GB"):
        fit("48gb", [], 1)


def test_auto_without_a_gpu_is_a_clear_error():
    from soar_lite.plan import fit

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU is visible: use --preset cpu-tiny"):
        fit("auto", [], None)


def test_a_cuda_run_that_will_not_fit_is_warned_before_any_work(monkeypatch):
    from soar_lite import plan as planner

    large = config.load_config("16gb", ["model.path=sd3.5-large"])
    planner.plan(large, "sd3.5-large", 12)  # imports diffusers' SD3 model before CUDA is faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(planner, "detected_vram_gb", lambda: 12.0)
    warning = planner.fit_warning(large, "16gb", ["model.path=sd3.5-large"])
    assert warning.startswith("warning: the planner estimates ~17.4 GiB for this run and this GPU has 12 GB")
    assert "add --vram 12 to apply quant=int8" in warning
    assert planner.fit_warning(config.load_config("16gb"), "16gb", []) is None  # Medium fits 12 GB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert planner.fit_warning(large, "16gb", []) is None  # no GPU: nothing to compare with
