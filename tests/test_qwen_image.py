"""Qwen-Image through the family seam, on a tiny Qwen-Image pipeline built in code.

References are diffusers' own Qwen-Image code (``QwenImagePipeline``'s template, ``encode_prompt``,
packing, true-CFG rescale and VAE normalisation, ``load_lora_weights`` + ``fuse_lora``) or a plain
restatement of shared/SOAR.md, never soar-lite's family module itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soar_lite import config, families
from soar_lite.config import LoraConfig, SoarConfig
from soar_lite.objective import Draws, PathDraws, soar_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soar_lite.toy.tiny_qwen_image import save_tiny_qwen_image

    return save_tiny_qwen_image(tmp_path_factory.mktemp("qwen-image"))


@pytest.fixture(scope="module")
def fam(qwen_dir):
    return families.load_family("qwen", str(qwen_dir))


def test_detection_defaults_and_the_offline_tokenizer(qwen_dir, fam, tiny_model_dir):
    from soar_lite.toy.tiny_qwen_image import TEMPLATE_PREFIX_TOKENS

    assert families.detect_family(qwen_dir) == "qwen" and families.detect_family(tiny_model_dir) == "sd3"
    assert families.resolve_family("auto", qwen_dir) == "qwen"
    with pytest.raises(families.UserError, match="holds a qwen model"):
        families.resolve_family("flux", qwen_dir)
    defaults = families.family_class("qwen").family_defaults(qwen_dir)
    assert defaults["soar.cfg_scale_sampling"] == 4.0 and defaults["soar.num_sampling_steps"] == 50
    # the tokenizer reloaded from the folder splits the pipeline's template as Qwen's own does:
    # its prefix is the 34 tokens QwenImagePipeline drops, and every template word is one token
    pipe = fam.pipe
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert (
        len(pipe.tokenizer(prefix).input_ids)
        == TEMPLATE_PREFIX_TOKENS
        == pipe.prompt_template_encode_start_idx
    )
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(" relationships").input_ids) == [
        "Ġrelationships"
    ]
    assert fam.resolution_multiple == 8  # VAE factor 4 x the 2x2 packing


def test_prompt_embeddings_are_the_pipelines_padded_with_their_mask(fam):
    prompts = ["a red circle", "a blue square at the top left"]
    got = fam.encode_prompts(prompts)
    ref, ref_mask = fam.pipe.encode_prompt(prompt=prompts, device="cpu", max_sequence_length=16)
    n = ref.shape[1]
    assert got["prompt_embeds"].shape == (2, 16, 16)
    torch.testing.assert_close(got["prompt_embeds"][:, :n], ref)
    assert torch.all(got["prompt_embeds"][:, n:] == 0)
    assert got["pooled_prompt_embeds"][:, :n].long().tolist() == ref_mask.tolist()
    assert got["pooled_prompt_embeds"].sum(1).tolist() == [8.0, 12.0]  # 3 / 7 words + 5 closing tokens
    # the empty prompt is the sampler's negative prompt " "
    empty = fam.encode_prompts([""])
    neg, _ = fam.pipe.encode_prompt(prompt=[" "], device="cpu", max_sequence_length=16)
    torch.testing.assert_close(empty["prompt_embeds"][:, : neg.shape[1]], neg)


def test_velocity_matches_the_pipelines_call_and_ignores_padding(fam):
    """The family's velocity on (B, 16, H, W) equals the transformer called as QwenImagePipeline calls
    it (packed latents, t / 1000, img_shapes, the unpadded embeddings and mask)."""
    from diffusers import QwenImagePipeline

    z = torch.randn(2, 16, 8, 12)
    cond = fam.encode_prompts(["a red circle", "a blue square at the top left"])
    ref_embeds, ref_mask = fam.pipe.encode_prompt(
        prompt=["a red circle", "a blue square at the top left"], device="cpu", max_sequence_length=16
    )
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        packed = QwenImagePipeline._pack_latents(z, 2, 16, 8, 12)
        ref = fam.transformer(
            hidden_states=packed, timestep=t / 1000, encoder_hidden_states=ref_embeds,
            encoder_hidden_states_mask=ref_mask, img_shapes=[[(1, 4, 6)]] * 2, return_dict=False,
        )[0]  # fmt: skip
        got = fam.velocity(fam.transformer)(z, t, cond)
    ref = QwenImagePipeline._unpack_latents(ref, 32, 48, 4)[:, :, 0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_true_cfg_is_the_pipelines_rescaled_guidance():
    """Written as QwenImagePipeline.__call__ writes it, on packed predictions."""
    from diffusers import QwenImagePipeline

    from soar_lite.families.qwen_image import true_cfg

    g = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    noise_pred = QwenImagePipeline._pack_latents(v_c, 2, 16, 8, 8)
    neg_noise_pred = QwenImagePipeline._pack_latents(v_u, 2, 16, 8, 8)
    comb_pred = neg_noise_pred + 4.0 * (noise_pred - neg_noise_pred)
    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    ref = QwenImagePipeline._unpack_latents(comb_pred * (cond_norm / noise_norm), 32, 32, 4)[:, :, 0]
    torch.testing.assert_close(true_cfg(v_c, v_u, 4.0), ref)
    assert not torch.allclose(ref, v_u + 4.0 * (v_c - v_u))  # the rescale matters


def test_latents_are_the_vaes_normalised_by_its_stats(fam):
    """encode_images inverts what the pipeline's decode does: latents / (1 / std) + mean."""
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = fam.encode_images(pixels)
    vae = fam.pipe.vae
    mode = vae.encode(pixels[:, :, None]).latent_dist.mode()
    std_inv = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    torch.testing.assert_close((z[:, :, None] / std_inv + mean), mode, rtol=1e-5, atol=1e-5)
    assert z.shape == (2, 16, 8, 8)
    grid = fam.noise_grid((8, 8))  # diffusers' Qwen-Image LoRA script: the unshifted training grid
    assert torch.allclose(grid.sigmas, torch.linspace(1.0, 1000, 1000).flip(0) / 1000)


def test_rollout_is_true_cfg_with_the_negative_prompt(fam):
    """Steps 1-7 of SOAR.md written out (ODE path, K = 1) with the pipeline's rescaled CFG."""
    from soar_lite import lora
    from soar_lite.families.qwen_image import true_cfg

    model = families.load_family("qwen", str(fam.path), text_encoders=False, vae=False).transformer
    torch.manual_seed(0)
    params = lora.add_lora(model, LoraConfig(rank=4, alpha=4.0, targets=list(fam.default_lora_targets)))
    for p in params:
        p.data.normal_(0, 0.05)
    cond = fam.encode_prompts(["a red circle", "a green triangle", "a blue square"])
    uncond = fam.encode_prompts([""])
    uncond3 = {k: v.expand(3, *v.shape[1:]) for k, v in uncond.items()}
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(3, 16, 8, 8, generator=g)
    cfg = SoarConfig(lambda_aux=1.0, trajectory_length=1, cfg_scale_sampling=4.0, num_sampling_steps=50)
    rollout = fam.rollout(model, config.TrainConfig(soar=cfg))
    assert "rescaled" in rollout.describe(cfg)
    draws = Draws(torch.randn(z0.shape, generator=g), torch.tensor([0.8123, 0.3456, 0.0123]))
    draws.paths.append(PathDraws(None, torch.rand((1, 3), generator=g)))
    grid = fam.noise_grid()
    f = fam.velocity(model)
    report = soar_loss(f, z0, cond, uncond3, grid, cfg, rollout=rollout, draws=draws)
    sig, ts, n = grid.sigmas, grid.timesteps, len(grid.sigmas)
    total = torch.zeros(())
    for b in range(3):
        t0 = float(draws.t0[b])
        i0 = min(max(int((1 - t0) * n), 0), n - 1)
        s0, zb, z1 = sig[i0], z0[b : b + 1], draws.z1[b : b + 1]
        cb, ub = ({k: v[b : b + 1] for k, v in c.items()} for c in (cond, uncond3))
        zs = (1 - s0) * zb + s0 * z1
        pred = f(zs, ts[i0 : i0 + 1], cb)
        total = total + ((pred - (z1 - zb)) ** 2).mean()
        with torch.no_grad():
            v = true_cfg(pred.detach(), f(zs, ts[i0 : i0 + 1], ub), 4.0)
        t1 = max(t0 - 1 / 50, 0.0)
        s1 = sig[min(max(int((1 - t1) * n), 0), n - 1)]
        z_step = zs + v * (s1 - s0)
        s_aux = s1 + draws.paths[0].u[0, b] * (1 - s1)
        a = (s_aux - s1) / (1 - s1)
        z_aux = (1 - a) * z_step + a * z1
        j = int((sig > s_aux).sum())
        t_prime = torch.tensor(1.0) - torch.tensor(float(min(j, n - 1))) / n
        k = min(max(int(((1 - t_prime) * n).floor()), 0), n - 1)
        total = total + ((f(z_aux, ts[k : k + 1], cb) - (z_aux - zb) / s_aux) ** 2).mean()
    torch.testing.assert_close(report.loss, total.detach() / 6, rtol=1e-5, atol=0)
    assert report.nograd_forwards == 1  # the conditional half is the main pass's output


def test_swap_on_qwen_gives_the_same_gradient(fam):
    import copy

    from soar_lite import lora
    from soar_lite.swap import BlockSwap

    base = families.load_family("qwen", str(fam.path), text_encoders=False, vae=False).transformer
    cond = fam.encode_prompts(["a red circle", "a green triangle"])
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for swapped in (False, True):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        params = lora.add_lora(model, LoraConfig(rank=4, alpha=4.0, targets=list(fam.default_lora_targets)))
        for p in params:
            p.data.normal_(0, 0.05)
        model.enable_gradient_checkpointing()
        if swapped:
            BlockSwap(model, 2, "cpu", poison=True)
        fam.velocity(model)(z, torch.tensor([700.0, 300.0]), cond).square().mean().backward()
        # (the last block's text stream feeds nothing: its LoRA gets no gradient with or without swap)
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- presets and the planner


@pytest.mark.parametrize("name", ["qwen-image-16gb", "qwen-image-24gb"])
def test_qwen_presets_validate_and_fit_their_tier(name):
    from soar_lite.plan import plan, preset_family, tier_of

    cfg = config.load_config(name)
    assert cfg.model.path == "Qwen/Qwen-Image" and cfg.model.swap_blocks > 0
    assert preset_family(name) == "qwen"
    header = config.preset_header(name)
    assert header.startswith(f"soar-lite train --preset {name}")
    result = plan(cfg, "Qwen/Qwen-Image", tier_of(name))
    assert result.fits, result.render()
    assert f"{result.total:.1f}" in header and f"{result.swap.load_gb:.1f}" in header
    unswapped = plan(config.load_config(name, ["swap_blocks=0"]), "qwen-image", tier_of(name))
    assert unswapped.total > result.total


def test_planner_knows_qwen_image_from_a_shipped_config():
    from soar_lite.plan import GIB, fit, plan

    cfg = config.load_config("qwen-image-16gb", ["quant=none", "swap_blocks=0"])
    bf16 = plan(cfg, "qwen-image", 16)
    assert 20.4e9 * 2 / GIB < bf16.parts["base weights (none, bfloat16)"] < 20.5e9 * 2 / GIB  # 20.4 B params
    assert bf16.cache.encoders_gb["Qwen2.5-VL-7B"] > 15 and bf16.cache.mode == "sequential"
    assert fit("auto", ["model.path=Qwen/Qwen-Image"], 24)[0] == "qwen-image-24gb"
    assert fit("auto", ["model.path=Qwen/Qwen-Image"], 16)[0] == "qwen-image-16gb"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_qwen_preset_trains_both_arms_and_the_lora_loads_in_diffusers_and_comfyui(
    qwen_dir, tiny_data_dir, tmp_path, capsys
):
    from diffusers import QwenImagePipeline

    from soar_lite.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "qwen-image-16gb", "--model", str(qwen_dir), "--data", str(tiny_data_dir)]
    args += ["--output", str(out), "steps=2", "batch_size=2", "gradient_accumulation=1", "resolution=32"]
    args += ["trajectory_length=2", "validation.num_prompts=1", "validation.every=0", "checkpoint_every=0"]
    args += ["lr=1e-2", "warmup_steps=0", "max_sequence_length=16", "validation.steps=2", "swap_blocks=1"]
    args += ["objective=both"]  # the preset as shipped: NF4 base, 8-bit AdamW
    assert main(args) == 0
    record = json.loads((out / "soar" / "soar_lite_run.json").read_text())
    assert record["family"] == "qwen" and record["config"]["model"]["quant"] == "nf4"
    assert record["config"]["model"]["swap_blocks"] == 1
    assert record["rollout"].startswith("two-pass CFG at 4, rescaled to the conditional norm")
    assert (out / "compare" / "grid.png").is_file()
    state = load_file(str(out / "soar" / "pytorch_lora_weights.safetensors"))
    assert any(".img_mlp." in k for k in state) and any(".txt_mlp." in k for k in state)
    # ComfyUI (comfy/lora.py, model_lora_keys_unet for QwenImage) maps "transformer.<name>" to its
    # "diffusion_model.<name>.weight" and reads "<name>.lora_A/B.weight"; its Qwen-Image model
    # (comfy/ldm/qwen_image/model.py) names a block's linear layers as below:
    comfy_block = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mod.1", "txt_mod.1",
                   "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"}  # fmt: skip
    for key in state:  # every key loads there: no "lora key not loaded"
        module, _, tail = key.removeprefix("transformer.").partition(".lora_")
        kind, _, rest = module.partition(".")
        block, _, name = rest.partition(".")
        assert kind == "transformer_blocks" and block.isdigit() and name in comfy_block, key
        assert tail in ("A.weight", "B.weight"), key
    assert main(["export", str(out / "soar"), "--format", "comfyui", "--output", str(tmp_path / "c")]) == 0
    comfy = load_file(str(tmp_path / "c" / "pytorch_lora_weights_comfyui.safetensors"))
    assert comfy.keys() == state.keys()
    capsys.readouterr()
    assert main(["export", str(out / "soar"), "--format", "kohya", "--output", str(tmp_path / "k")]) == 2
    assert "no kohya layout is written for Qwen-Image" in capsys.readouterr().err

    pipe = QwenImagePipeline.from_pretrained(str(qwen_dir))
    base = {
        n: m.weight.detach().clone()
        for n, m in pipe.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    prompt = {"prompt": "a red circle", "negative_prompt": " ", "true_cfg_scale": 4.0, "height": 32,
              "width": 32, "num_inference_steps": 2, "max_sequence_length": 16}  # fmt: skip
    before = pipe(**prompt, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.load_lora_weights(str(out / "soar" / "pytorch_lora_weights.safetensors"))
    after = pipe(**prompt, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert abs(after - before).max() > 1e-4  # the LoRA changes the output
    pipe.fuse_lora()
    adapted = 0
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("transformer.").split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        fused = pipe.transformer.get_submodule(module).base_layer.weight
        torch.testing.assert_close(fused, base[module] + b.float() @ a.float(), rtol=1e-5, atol=1e-6)
        adapted += 1
    assert adapted == len(state) // 2 and adapted > 10


def test_unset_sizes_follow_the_one_rule(qwen_dir, tmp_path):
    """The folder's soar_lite.json, else Qwen-Image's own: 1024 px, 512 text tokens (the pipeline's)."""
    import shutil

    bare = tmp_path / "qwen-bare"
    shutil.copytree(qwen_dir, bare)
    (bare / "soar_lite.json").unlink(missing_ok=True)
    assert families.native_resolution(bare) == 1024 and families.text_length(bare) == 512
