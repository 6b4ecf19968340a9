"""LoRA interop: kohya/SAI mapping against hand-computed tensors and diffusers' own SD3 converter,
the trained file fused by diffusers at a strength != 1, kohya round trip, and merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from soar_lite import export
from soar_lite.cli import main
from soar_lite.config import LoraConfig
from soar_lite.errors import UserError
from soar_lite.lora import LORA_FILE, add_lora, save_lora

HIDDEN = 64  # 2 heads x 32


def tiny_sd35_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """SD3.5-Medium-shaped: a dual-attention (attn2) first block and RMS qk-norm, 2 layers."""
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    return tiny_sd3_transformer(
        seed,
        attention_head_dim=32,
        caption_projection_dim=HIDDEN,  # joint_attention_dim 64: the tiny pipeline's two CLIPs (32 + 32)
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


@pytest.fixture(scope="module")
def sd35_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with the SD3.5-style transformer in place of the SD3 one."""
    from diffusers import StableDiffusion3Pipeline

    from soar_lite.toy.tiny_sd3 import build_tiny_components, save_tiny_pipeline

    components = build_tiny_components(0)
    components["transformer"] = tiny_sd35_transformer(2)
    pipe = StableDiffusion3Pipeline(**components)
    return save_tiny_pipeline(pipe, tmp_path_factory.mktemp("tiny-sd35"))


# ---------------------------------------------------------------- an independent SAI view of the weights

_QK = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}


def sai_checkpoint(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in Stability's single-file layout (test helper).

    It is checked below to be the exact inverse of diffusers' converter, which makes it an oracle
    for the LoRA mapping: merge a kohya LoRA into it by hand, convert, compare with diffusers' fuse.
    """
    out: dict[str, torch.Tensor] = {"pos_embed": sd["pos_embed.pos_embed"]}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "pos_embed.pos_embed":
            continue
        module, _, leaf = key.rpartition(".")
        block, _, rest = module.partition(".")[2].partition(".")
        if module.startswith("transformer_blocks.") and rest in _QK:
            out[f"joint_blocks.{block}.{_QK[rest]}.{leaf}"] = value
            continue
        sai, slot, _ = export._diffusers_to_sai(module)
        last_context = sai == f"joint_blocks.{num_layers - 1}.context_block.adaLN_modulation.1"
        if sai == "final_layer.adaLN_modulation.1" or last_context:
            value = export.swap_halves(value)
        fused.setdefault(f"{sai}.{leaf}", {})[slot] = value
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def merge_kohya_by_hand(sai: dict[str, torch.Tensor], kohya: dict[str, torch.Tensor]) -> dict:
    """W_sai + alpha/rank * up @ down for every kohya module, matched by name with dots as underscores."""
    by_name = {k[: -len(".weight")].replace(".", "_"): k for k in sai if k.endswith(".weight")}
    merged = dict(sai)
    for key in kohya:
        if key.endswith(".lora_down.weight"):
            name = key[len("lora_unet_") : -len(".lora_down.weight")]
            down, up = kohya[key], kohya[f"lora_unet_{name}.lora_up.weight"]
            scale = float(kohya[f"lora_unet_{name}.alpha"]) / down.shape[0]
            target = by_name[name]
            merged[target] = sai[target] + scale * (up @ down)
    return merged


def test_sai_view_is_the_inverse_of_diffusers_converter():
    model = tiny_sd35_transformer()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers(sai_checkpoint(sd, 2))
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


# ---------------------------------------------------------------- hand-computed mapping


def _ab(rank: int, out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def _state(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in modules.items():
        out[f"transformer.{name}.lora_A.weight"] = a
        out[f"transformer.{name}.lora_B.weight"] = b
    return out


def test_kohya_fuses_qkv_into_stacked_down_and_block_diagonal_up():
    h = 4
    aq, bq = _ab(2, h, h, 1)
    ak, bk = _ab(2, h, h, 2)
    av, bv = _ab(3, h, h, 3)  # another rank: ranks add up
    cq, cbq = _ab(2, h, h, 4)  # context branch, q only
    ao, bo = _ab(2, h, h, 5)
    state = _state(
        {
            "transformer_blocks.1.attn.to_q": (aq, bq),
            "transformer_blocks.1.attn.to_k": (ak, bk),
            "transformer_blocks.1.attn.to_v": (av, bv),
            "transformer_blocks.1.attn.add_q_proj": (cq, cbq),
            "transformer_blocks.1.attn.to_out.0": (ao, bo),
        }
    )
    kohya = export.to_kohya(state, strength=0.5)
    x = "lora_unet_joint_blocks_1_x_block_attn_qkv"
    assert torch.equal(kohya[f"{x}.lora_down.weight"], torch.cat([aq, ak, av]))
    up = torch.zeros(3 * h, 7)
    up[0:h, 0:2], up[h : 2 * h, 2:4], up[2 * h :, 4:7] = 0.5 * bq, 0.5 * bk, 0.5 * bv
    assert torch.equal(kohya[f"{x}.lora_up.weight"], up)
    assert float(kohya[f"{x}.alpha"]) == 7.0  # alpha = rank: scale 1, strength already folded
    delta = kohya[f"{x}.lora_up.weight"] @ kohya[f"{x}.lora_down.weight"]
    torch.testing.assert_close(delta, 0.5 * torch.cat([bq @ aq, bk @ ak, bv @ av]))
    c = "lora_unet_joint_blocks_1_context_block_attn_qkv"
    torch.testing.assert_close(
        kohya[f"{c}.lora_up.weight"] @ kohya[f"{c}.lora_down.weight"],
        0.5 * torch.cat([cbq @ cq, torch.zeros(h, h), torch.zeros(h, h)]),
    )
    p = "lora_unet_joint_blocks_1_x_block_attn_proj"
    assert torch.equal(kohya[f"{p}.lora_up.weight"], 0.5 * bo) and torch.equal(
        kohya[f"{p}.lora_down.weight"], ao
    )
    assert len(kohya) == 9


def test_kohya_swaps_scale_and_shift_of_final_norm_and_last_context_norm_only():
    h = 4
    a_final, b_final = _ab(2, 2 * h, h, 1)
    a_last, b_last = _ab(2, 2 * h, h, 2)  # last block: context norm is (scale, shift) only
    a_mid, b_mid = _ab(2, 6 * h, h, 3)  # any other block: 6 x hidden, same order in both layouts
    state = _state(
        {
            "norm_out.linear": (a_final, b_final),
            "transformer_blocks.1.norm1_context.linear": (a_last, b_last),
            "transformer_blocks.0.norm1_context.linear": (a_mid, b_mid),
        }
    )
    kohya = export.to_kohya(state)
    final = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(
        final, torch.cat([b_final[h:], b_final[:h]])
    )  # diffusers (scale, shift) -> (shift, scale)
    last = kohya["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(last, torch.cat([b_last[h:], b_last[:h]]))
    mid = kohya["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(mid, b_mid)
    back = export.from_kohya(kohya)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value)


def test_module_without_sai_equivalent_is_a_clear_error():
    state = _state({"transformer_blocks.0.not_a_layer": _ab(1, 2, 2, 0)})
    with pytest.raises(UserError, match="no SD3 single-file"):
        export.to_kohya(state)


def _random_lora(transformer: torch.nn.Module, targets: list[str], rank: int = 3, seed: int = 0) -> dict:
    """A LoRA on ``transformer``'s modules named ``targets`` (peft names), random non-zero weights."""
    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    params = add_lora(transformer, cfg)
    torch.manual_seed(seed)
    for p in params:
        p.data.normal_(0, 0.1)
    from soar_lite.lora import folded_state

    return folded_state(transformer, cfg)


# Every linear layer kind of an SD3 / SD3.5 transformer (peft matches name suffixes).
ALL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2", "norm_out.linear", "proj_out", "context_embedder", "linear_1", "linear_2",
]  # fmt: skip


def test_kohya_lora_merged_by_hand_in_sai_layout_equals_diffusers_fuse(tmp_path):
    """Every mappable module of an SD3.5-style transformer, strength 0.7: SAI merge == diffusers fuse."""
    from diffusers import StableDiffusion3Pipeline  # noqa: F401  (diffusers' loader via the model mixin)

    state = _random_lora(tiny_sd35_transformer(), ALL_TARGETS)
    kohya = export.to_kohya(state, strength=0.7)
    assert any("attn2_qkv" in k for k in kohya) and any("context_block_attn_qkv" in k for k in kohya)
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight" in kohya

    base = tiny_sd35_transformer()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    base.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    base.fuse_lora(lora_scale=0.7)
    base.unload_lora()
    fused = base.state_dict()

    merged = merge_kohya_by_hand(sai_checkpoint(base_sd, 2), kohya)
    got = convert_sd3_transformer_checkpoint_to_diffusers(merged)
    changed = 0
    for key in fused:
        torch.testing.assert_close(got[key], fused[key], rtol=1e-5, atol=1e-6, msg=key)
        changed += not torch.equal(fused[key], base_sd[key])
    assert changed >= 20


def test_kohya_round_trip_gives_the_same_update_per_module():
    state = _random_lora(tiny_sd35_transformer(), ALL_TARGETS, seed=3)
    back = export.from_kohya(export.to_kohya(state, strength=1.3))
    pairs, back_pairs = export.adapter_pairs(state), export.adapter_pairs(back)
    assert pairs.keys() == back_pairs.keys()
    for name, (a, b) in pairs.items():
        a2, b2 = back_pairs[name]
        torch.testing.assert_close(b2 @ a2, 1.3 * (b @ a), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- trained file, diffusers, merge


def _train(model_dir: Path, data_dir: Path, output: Path, **extra) -> Path:
    from soar_lite import config, train
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(**{"model.path": model_dir, "data.path": data_dir, "steps": 2, **extra})
    return train.train(config.load_config("cpu-tiny", overrides), output, progress=False)


@pytest.mark.slow
def test_trained_lora_fuses_in_diffusers_to_base_plus_strength_BA_everywhere(
    sd35_model_dir, tiny_data_dir, tmp_path
):
    """Train on an SD3.5-style tiny pipeline; diffusers' load_lora_weights + fuse_lora(0.6) must give
    W + 0.6 B A in every adapted module (image branch, context branch, attn2); the kohya export of the
    same file, merged by hand in the SAI layout, must give the same weights."""
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    out = _train(sd35_model_dir, tiny_data_dir, tmp_path / "run", lr=1e-2)
    weights = load_file(str(out / LORA_FILE))
    pairs = export.adapter_pairs(weights)
    for needle in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "attn2.to_v", "attn2.to_out.0"):
        assert any(name.endswith(needle) for name in pairs), needle

    pipe = load_tiny_pipeline(sd35_model_dir)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(out / LORA_FILE))
    pipe.fuse_lora(lora_scale=0.6)
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    unchanged = set()
    for name, (a, b) in pairs.items():
        key = f"{name}.weight"
        torch.testing.assert_close(fused[key], base[key] + 0.6 * (b @ a), rtol=1e-5, atol=1e-6, msg=key)
        if torch.equal(fused[key], base[key]):
            unchanged.add(name)
    # Every adapter in the file trained (the last block's context queries, whose outputs that block
    # throws away, carry none: it would never get a gradient)
    assert unchanged == set() and "transformer_blocks.1.attn.add_q_proj" not in pairs
    assert "transformer_blocks.0.attn.add_q_proj" in pairs

    kohya_file = export.export_lora(out, "kohya", tmp_path / "k.safetensors", strength=0.6)
    merged = merge_kohya_by_hand(sai_checkpoint(base, 2), load_file(str(kohya_file)))
    got = convert_sd3_transformer_checkpoint_to_diffusers(merged)
    for key in fused:
        torch.testing.assert_close(got[key], fused[key], rtol=1e-5, atol=1e-6, msg=key)


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, 16, 16, generator=g),
        timestep=torch.tensor([300.0, 800.0]),
        encoder_hidden_states=torch.randn(2, 14, 64, generator=g),
        pooled_projections=torch.randn(2, 64, generator=g),
        return_dict=False,
    )


def test_merge_writes_a_transformer_whose_output_equals_the_lora_one(sd35_model_dir, tmp_path):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    lora_transformer = load_tiny_pipeline(sd35_model_dir).transformer
    cfg = LoraConfig(rank=4, alpha=8.0)
    for p in add_lora(lora_transformer, cfg):
        p.data.normal_(0, 0.05)
    save_lora(lora_transformer, cfg, tmp_path / "lora", {"objective": "soar"})

    merged_dir = export.merge_lora(str(sd35_model_dir), [(tmp_path / "lora", 0.8)], tmp_path / "merged")
    merged = SD3Transformer2DModel.from_pretrained(merged_dir)
    reference = load_tiny_pipeline(sd35_model_dir)
    reference.load_lora_weights(str(tmp_path / "lora" / LORA_FILE), adapter_name="x")
    reference.set_adapters(["x"], [0.8])
    with torch.no_grad():
        want = reference.transformer(**_inputs())[0]
        got = merged(**_inputs())[0]
        base = load_tiny_pipeline(sd35_model_dir).transformer(**_inputs())[0]
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    record = json.loads((merged_dir / "soar_lite_merge.json").read_text())
    assert record["merged"][0]["strength"] == 0.8
    with pytest.raises(UserError, match="not empty"):
        export.merge_lora(str(sd35_model_dir), [(tmp_path / "lora", 1.0)], merged_dir)


def test_export_cli_writes_kohya_and_comfyui_files_that_read_back(tiny_model_dir, tmp_path, capsys):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    transformer = load_tiny_pipeline(tiny_model_dir).transformer
    cfg = LoraConfig(rank=2, alpha=4.0)
    for p in add_lora(transformer, cfg):
        p.data.normal_(0, 0.05)
    run = tmp_path / "run"
    save_lora(transformer, cfg, run, {})
    assert main(["export", str(run), "--format", "kohya", "--output", str(tmp_path / "out")]) == 0
    kohya_file = tmp_path / "out" / "pytorch_lora_weights_kohya.safetensors"
    assert str(kohya_file) in capsys.readouterr().out
    keys = load_file(str(kohya_file)).keys()
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert (
        main(["export", str(kohya_file), "--format", "comfyui", "--output", str(tmp_path / "c.safetensors")])
        == 0
    )
    comfy = load_file(str(tmp_path / "c.safetensors"))
    assert all(k.startswith("transformer.") for k in comfy)
    original = export.adapter_pairs(load_file(str(run / LORA_FILE)))
    for name, (a, b) in export.adapter_pairs(comfy).items():
        torch.testing.assert_close(b @ a, original[name][1] @ original[name][0], rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["export", str(run), "--format", "onnx", "--output", str(tmp_path / "x")])


def test_foreign_lora_layout_is_a_clear_error(tmp_path):
    save_file({"unet.down.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="unrecognised LoRA layout"):
        export.read_any_lora(tmp_path / "x.safetensors")
