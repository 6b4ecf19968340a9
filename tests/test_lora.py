"""The LoRA file contract: alpha/rank folded in, so diffusers (scale 1, no alpha) reproduces the adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from soar_lite.config import LoraConfig
from soar_lite.errors import UserError
from soar_lite.lora import LORA_FILE, add_lora, save_lora


def _inputs(transformer):
    g = torch.Generator().manual_seed(1)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(2, 16, 16, 16, generator=g),
        timestep=torch.tensor([300.0, 800.0]),
        encoder_hidden_states=torch.randn(2, 14, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
        return_dict=False,
    )


def test_saved_file_reproduces_the_adapter_in_diffusers(tiny_model_dir, tmp_path):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    trained = load_tiny_pipeline(tiny_model_dir).transformer
    cfg = LoraConfig(rank=4, alpha=12.0)  # scale 3: a loader that ignored it would be off by 3x
    params = add_lora(trained, cfg)
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.05)
    with torch.no_grad():
        want = trained(**_inputs(trained))[0]
    path = save_lora(trained, cfg, tmp_path, {"objective": "soar"})
    assert path.name == LORA_FILE
    with safe_open(str(path), "pt") as f:
        assert not [k for k in list(f.keys()) if "alpha" in k]
        assert "lora_adapter_metadata" not in (f.metadata() or {})  # diffusers would rescale by alpha/rank

    pipe = load_tiny_pipeline(tiny_model_dir)
    with torch.no_grad():
        base = pipe.transformer(**_inputs(pipe.transformer))[0]
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        got = pipe.transformer(**_inputs(pipe.transformer))[0]
    assert (base - want).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_default_targets_cover_both_branches(tiny_model_dir):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    transformer = load_tiny_pipeline(tiny_model_dir).transformer
    add_lora(transformer, LoraConfig(rank=2, alpha=2))
    names = {n for n, _ in transformer.named_modules() if n.endswith("lora_A")}
    for module in ("attn.to_q", "attn.to_out.0", "attn.add_k_proj", "attn.to_add_out"):
        assert any(f"transformer_blocks.0.{module}.lora_A" == n for n in names), module


def test_targets_matching_nothing_are_a_clear_error(tiny_model_dir):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    transformer = load_tiny_pipeline(tiny_model_dir).transformer
    with pytest.raises(UserError, match="match no module"):
        add_lora(transformer, LoraConfig(rank=2, alpha=2, targets=["not_a_layer"]))


def test_every_adapter_gets_a_gradient_none_is_dead_weight():
    """SD3's last block discards its text stream: no adapter on its text-query projection."""
    from soar_lite.config import LoraConfig
    from soar_lite.lora import add_lora
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    model = tiny_sd3_transformer(0, num_layers=3)
    model.requires_grad_(False)
    add_lora(model, LoraConfig(rank=4, alpha=4.0))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("transformer_blocks.2.attn.add_q_proj") for n in trained)
    assert any(n.startswith("transformer_blocks.2.attn.add_k_proj") for n in trained)  # image queries use it
    assert any(n.startswith("transformer_blocks.1.attn.add_q_proj") for n in trained)
    with torch.no_grad():
        for n, p in trained.items():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 at init would zero every A gradient
    out = model(
        hidden_states=torch.randn(1, 16, 16, 16),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 5, 64),
        pooled_projections=torch.randn(1, 64),
        return_dict=False,
    )[0]
    out.square().mean().backward()
    assert [n for n, p in trained.items() if p.grad is None or not p.grad.abs().sum()] == []


@pytest.mark.parametrize(("quant", "noted"), [("nf4", True), ("none", False)])
def test_a_lora_trained_on_a_quantized_base_says_so_when_sampled(tmp_path, capsys, quant, noted):
    from soar_lite.lora import training_note
    from soar_lite.sample import read_loras
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    model = tiny_sd3_transformer(0)
    model.requires_grad_(False)
    add_lora(model, LoraConfig(rank=4, alpha=4.0))
    path = save_lora(model, LoraConfig(rank=4, alpha=4.0), tmp_path, {"base_quant": quant})
    assert training_note(path)["base_quant"] == quant and training_note(tmp_path / "none") == {}
    read_loras([(str(path), 1.0)])
    err = capsys.readouterr().err
    assert (f"was trained on a {quant} base" in err) is noted


def test_rslora_scale_alpha_over_sqrt_rank_is_folded_so_diffusers_reads_the_same_strength(
    tiny_model_dir, tmp_path
):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    trained = load_tiny_pipeline(tiny_model_dir).transformer
    cfg = LoraConfig(rank=4, alpha=12.0, use_rslora=True)  # rsLoRA scale 12 / 2 = 6, plain LoRA's 3
    params = add_lora(trained, cfg)
    assert trained.transformer_blocks[0].attn.to_q.scaling["default"] == 6.0
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.05)
    with torch.no_grad():
        want = trained(**_inputs(trained))[0]
    path = save_lora(trained, cfg, tmp_path, {})
    pipe = load_tiny_pipeline(tiny_model_dir)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        got = pipe.transformer(**_inputs(pipe.transformer))[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    from safetensors.torch import load_file

    module = "transformer.transformer_blocks.0.attn.to_q"
    b = load_file(str(path))[f"{module}.lora_B.weight"]
    raw = trained.transformer_blocks[0].attn.to_q.lora_B["default"].weight.detach()
    torch.testing.assert_close(b, 6.0 * raw)
