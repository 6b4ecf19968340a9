"""FLUX.1 (dev and schnell) through the family seam, on tiny FLUX pipelines built in code.

References are diffusers' own FLUX code (``FluxPipeline``'s packing, image ids and sampler grid,
``load_lora_weights`` + ``fuse_lora``) or a plain restatement of shared/SOAR.md, never soar-lite's
family module itself.
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
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soar_lite.toy.tiny_flux import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("flux-dev"), schnell=False)


@pytest.fixture(scope="module")
def flux_schnell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soar_lite.toy.tiny_flux import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("flux-schnell"), schnell=True)


def _family(path: Path, **kw):
    return families.load_family("flux", str(path), **kw)


# ----------------------------------------------------------------------------- the seam


def test_family_detection(flux_dev, flux_schnell, tiny_model_dir):
    assert families.detect_family(flux_dev) == "flux" and families.detect_family(flux_schnell) == "flux"
    assert families.detect_family(tiny_model_dir) == "sd3"
    assert families.resolve_family("auto", flux_dev) == "flux"
    with pytest.raises(families.UserError, match="holds a flux model"):
        families.resolve_family("sd3", flux_dev)
    dev = families.family_class("flux").family_defaults(flux_dev)
    schnell = families.family_class("flux").family_defaults(flux_schnell)
    assert dev["soar.num_sampling_steps"] == 28 and dev["validation.guidance_scale"] == 3.5
    assert schnell["soar.num_sampling_steps"] == 4 and schnell["validation.guidance_scale"] == 0.0


def test_family_defaults_replace_only_untouched_generic_defaults(flux_schnell):
    defaults = families.family_class("flux").family_defaults(flux_schnell)
    cfg, applied = config.with_family_defaults(config.build_config({}, ["validation.steps=9"]), defaults)
    assert cfg.soar.num_sampling_steps == 4 and "soar.num_sampling_steps" in applied
    assert cfg.validation.steps == 9 and "validation.steps" not in applied  # the user's value stays
    assert cfg.lora.targets == list(families.family_class("flux").default_lora_targets)


def test_pack_and_velocity_match_the_pipeline(flux_dev):
    """The family's velocity on (B, 16, H, W) equals the transformer called as FluxPipeline calls it."""
    from diffusers import FluxPipeline

    from soar_lite.families.flux import pack, unpack

    fam = _family(flux_dev, text_encoders=False, vae=False)
    z = torch.randn(2, 16, 16, 12)
    packed = FluxPipeline._pack_latents(z, 2, 16, 16, 12)
    assert torch.equal(pack(z), packed)
    assert torch.equal(unpack(packed, 16, 12), FluxPipeline._unpack_latents(packed, 32, 24, 2))
    cond = {"prompt_embeds": torch.randn(2, 5, 32), "pooled_prompt_embeds": torch.randn(2, 32)}
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        ref = fam.transformer(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=torch.full((2,), 3.5),
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(5, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 6, "cpu", torch.float32),
            return_dict=False,
        )[0]
        got = fam.velocity(fam.transformer, 3.5)(z, t, cond)
        at_train = fam.velocity(fam.transformer)(z, t, cond)
    torch.testing.assert_close(got, FluxPipeline._unpack_latents(ref, 32, 24, 2))
    assert not torch.allclose(got, at_train)  # guidance 3.5 vs the training guidance 1.0


def test_resolution_grid_is_the_samplers(flux_dev):
    """train_shift=resolution: the grid equals FluxPipeline's sampler sigmas for the token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    fam = _family(
        flux_dev, transformer=False, text_encoders=False, options=config.FluxConfig(train_shift="resolution")
    )
    grid = fam.noise_grid((32, 48))
    sched = FlowMatchEulerDiscreteScheduler.from_config(fam.pipe.scheduler.config)
    cfg = sched.config
    mu = calculate_shift(
        16 * 24, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
    )
    sched.set_timesteps(1000, mu=mu)
    torch.testing.assert_close(grid.sigmas, sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fam.noise_grid((16, 16)).sigmas, grid.sigmas)  # another bucket, another grid
    plain = _family(flux_dev, transformer=False, text_encoders=False).noise_grid((32, 48))
    assert torch.allclose(plain.sigmas, torch.linspace(1.0, 1000, 1000).flip(0) / 1000)  # diffusers' script


# ----------------------------------------------------------------------------- the objective


def _lora_model(path: Path):
    fam = _family(path, text_encoders=False, vae=False)
    torch.manual_seed(0)
    from soar_lite import lora

    params = lora.add_lora(
        fam.transformer, LoraConfig(rank=4, alpha=4.0, targets=list(fam.default_lora_targets))
    )
    for p in params:  # non-zero B so that the adapter matters
        p.data.normal_(0, 0.05)
    return fam, params


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(3, 16, 8, 8, generator=g)
    cond = {
        "prompt_embeds": torch.randn(3, 5, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(3, 32, generator=g),
    }
    return z0, cond


def _draws(cfg: SoarConfig, z0: torch.Tensor) -> Draws:
    g = torch.Generator().manual_seed(7)
    t0 = torch.tensor(
        [0.8123, 0.3456, 0.0123]
    )  # off grid-cell boundaries: floor() is not decided by rounding
    d = Draws(torch.randn(z0.shape, generator=g), t0)
    if cfg.lambda_aux:
        d.paths.append(PathDraws(None, torch.rand((cfg.trajectory_length, 3), generator=g)))
    return d


def _grads(params) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def test_lambda_zero_is_plain_flow_matching(flux_dev):
    """SFT through the FLUX velocity: the loss and gradient of SOAR.md steps 1-3 written out plainly."""
    fam, params = _lora_model(flux_dev)
    z0, cond = _batch()
    cfg = SoarConfig(lambda_aux=0.0)
    draws = _draws(cfg, z0)
    grid = fam.noise_grid()
    f = fam.velocity(fam.transformer)
    report = soar_loss(
        f, z0, cond, None, grid, cfg, rollout=fam.rollout(fam.transformer, config.TrainConfig()), draws=draws
    )
    report.loss.backward()
    got = _grads(params)
    n = len(grid.sigmas)
    idx = [min(max(int((1 - float(t)) * n), 0), n - 1) for t in draws.t0]
    s = grid.sigmas[idx].reshape(-1, 1, 1, 1)
    zs = (1 - s) * z0 + s * draws.z1
    pred = f(zs, grid.timesteps[idx], cond)
    ref = ((pred - (draws.z1 - z0)) ** 2).reshape(3, -1).mean(1).sum() / 3
    ref.backward()
    torch.testing.assert_close(report.loss, ref.detach(), rtol=1e-6, atol=0)
    for a, b in zip(got, _grads(params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_per_term_equals_joint_and_reuse_equals_separate_pass(flux_dev, flux_schnell, variant):
    fam, params = _lora_model(flux_dev if variant == "dev" else flux_schnell)
    z0, cond = _batch()
    grid = fam.noise_grid()
    f = fam.velocity(fam.transformer)
    results = {}
    for name, reuse, per_term in (
        ("joint", True, False),
        ("per_term", True, True),
        ("separate", False, False),
    ):
        cfg = SoarConfig(lambda_aux=0.7, trajectory_length=2, reuse_main_pass=reuse)
        tcfg = config.TrainConfig(soar=dataclass_replace(cfg, rollout_guidance=1.0))  # g_roll == g_train
        rollout = fam.rollout(fam.transformer, tcfg)
        assert rollout.mode == "single" and rollout.velocity is None
        backward = (lambda term, last: term.backward()) if per_term else None
        report = soar_loss(
            f, z0, cond, None, grid, cfg, rollout=rollout, draws=_draws(cfg, z0), backward=backward
        )
        if not per_term:
            report.loss.backward()
        results[name] = (float(report.loss.detach()), _grads(params), report.nograd_forwards)
    assert results["joint"][2] == 0 and results["separate"][2] == 1  # reuse saves exactly one pass
    for other in ("per_term", "separate"):
        assert results[other][0] == pytest.approx(results["joint"][0], rel=1e-6)
        for a, b in zip(results[other][1], results["joint"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_dev_rollout_runs_at_the_samplers_guidance(flux_dev):
    """g_roll (3.5) != g_train (1.0): one extra no-grad pass, and its velocity is the one at 3.5.

    Reference: steps 4-6 written out with the velocity at 3.5 for the rollout and at 1.0 for the
    trained terms (ODE path, K = 1)."""
    fam, _ = _lora_model(flux_dev)
    z0, cond = _batch()
    grid = fam.noise_grid()
    cfg = SoarConfig(lambda_aux=1.0, trajectory_length=1, num_sampling_steps=28)
    rollout = fam.rollout(fam.transformer, config.TrainConfig(soar=cfg))
    assert rollout.velocity is not None and "embedded guidance" in rollout.describe(cfg)
    draws = _draws(cfg, z0)
    report = soar_loss(fam.velocity(fam.transformer), z0, cond, None, grid, cfg, rollout=rollout, draws=draws)
    assert report.nograd_forwards == 1
    f_train, f_roll = fam.velocity(fam.transformer, 1.0), fam.velocity(fam.transformer, 3.5)
    sig, ts, n = grid.sigmas, grid.timesteps, len(grid.sigmas)
    total = torch.zeros(())
    for b in range(3):
        t0 = float(draws.t0[b])
        i0 = min(max(int((1 - t0) * n), 0), n - 1)
        s0, zb, z1 = sig[i0], z0[b : b + 1], draws.z1[b : b + 1]
        cb = {k: v[b : b + 1] for k, v in cond.items()}
        zs = (1 - s0) * zb + s0 * z1
        total = total + ((f_train(zs, ts[i0 : i0 + 1], cb) - (z1 - zb)) ** 2).mean()
        with torch.no_grad():
            v = f_roll(zs, ts[i0 : i0 + 1], cb)
        t1 = max(t0 - 1 / 28, 0.0)
        s1 = sig[min(max(int((1 - t1) * n), 0), n - 1)]
        z_step = zs + v * (s1 - s0)
        s_aux = s1 + draws.paths[0].u[0, b] * (1 - s1)
        a = (s_aux - s1) / (1 - s1)
        z_aux = (1 - a) * z_step + a * z1
        j = int((sig > s_aux).sum())  # first grid index with sigma <= s' (SOAR.md step 6)
        t_prime = torch.tensor(1.0) - torch.tensor(float(min(j, n - 1))) / n
        k = min(max(int(((1 - t_prime) * n).floor()), 0), n - 1)
        total = total + ((f_train(z_aux, ts[k : k + 1], cb) - (z_aux - zb) / s_aux) ** 2).mean()
    torch.testing.assert_close(report.loss, total.detach() / 6, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- presets and the planner


@pytest.mark.parametrize("name", ["flux-8gb", "flux-12gb", "flux-16gb", "flux-24gb"])
def test_flux_presets_validate_and_fit_their_tier(name):
    from soar_lite.plan import plan, tier_of

    cfg = config.load_config(name)
    assert cfg.model.path == "black-forest-labs/FLUX.1-dev" and cfg.flux.guidance == 1.0
    header = config.preset_header(name)
    assert header.startswith(f"soar-lite train --preset {name}")
    for model in ("flux.1-dev", "flux.1-schnell"):
        result = plan(cfg, model, tier_of(name))
        assert result.fits, result.render()
        assert f"{result.total:.1f}" in header or model.endswith("schnell")  # header states the estimate


def test_planner_knows_flux_from_a_shipped_config():
    from soar_lite.plan import fit, plan

    cfg = config.load_config("flux-16gb")
    bf16 = plan(dataclass_replace(cfg, model=dataclass_replace(cfg.model, quant="none")), "flux.1-dev", 16)
    assert not bf16.fits and bf16.parts["base weights (none, bfloat16)"] > 22  # 11.9 B params in bf16
    assert fit("auto", ["model.path=flux.1-dev"], 24)[0] == "flux-24gb"
    assert fit("auto", [], 24)[0] == "24gb"
    assert fit("auto", ["model.path=flux.1-dev"], 8)[0] == "flux-8gb"  # block swap
    with pytest.raises(config.UserError, match="does not fit 2 GB"):
        fit("auto", ["model.path=flux.1-dev"], 2)


# ----------------------------------------------------------------------------- end to end


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    from soar_lite.cli import main

    args = ["train", "--preset", "flux-16gb", "--model", str(model), "--data", str(data)]
    args += ["--output", str(out), "steps=2", "batch_size=2", "gradient_accumulation=1", "resolution=32"]
    args += ["trajectory_length=2", "validation.num_prompts=1", "validation.every=0", "checkpoint_every=0"]
    args += ["lr=1e-2", "warmup_steps=0", "max_sequence_length=8", *extra]
    return main(args)


@pytest.mark.slow
def test_flux_dev_preset_trains_both_arms_and_the_lora_loads_in_diffusers(flux_dev, tiny_data_dir, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "run"
    assert _train(flux_dev, tiny_data_dir, out, "objective=both") == 0
    record = json.loads((out / "soar" / "soar_lite_run.json").read_text())
    assert record["family"] == "flux" and record["variant"] == "flux-dev"
    assert record["rollout"] == "one no-grad pass at the sampler's embedded guidance"
    assert (
        record["config"]["soar"]["num_sampling_steps"] == 28 and record["config"]["model"]["quant"] == "nf4"
    )
    assert (out / "compare" / "grid.png").is_file()
    state = load_file(str(out / "soar" / "pytorch_lora_weights.safetensors"))
    assert any(".single_transformer_blocks." in k for k in state) and any(".ff_context." in k for k in state)
    # ComfyUI's LoRA loader maps "transformer.<diffusers module>" for FLUX through its
    # comfy/utils.py flux_to_diffusers table; these are the block modules that table lists:
    comfy_double = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "norm1.linear",
                    "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2"}  # fmt: skip
    comfy_single = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out"}
    for key in state:  # every key loads there: no "lora key not loaded"
        kind, _, module = key.removeprefix("transformer.").split(".lora_")[0].partition(".")
        block, _, name = module.partition(".")
        assert block.isdigit() and name in (
            comfy_single if kind == "single_transformer_blocks" else comfy_double
        )

    pipe = FluxPipeline.from_pretrained(str(flux_dev))
    base = {
        n: m.weight.detach().clone()
        for n, m in pipe.transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    prompt = {
        "prompt": "a red circle",
        "height": 32,
        "width": 32,
        "num_inference_steps": 2,
        "max_sequence_length": 8,
    }
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


@pytest.mark.slow
def test_flux_schnell_trains_with_its_own_sampler(flux_schnell, tiny_data_dir, tmp_path):
    out = tmp_path / "schnell"
    assert _train(flux_schnell, tiny_data_dir, out, "objective=soar") == 0
    record = json.loads((out / "soar_lite_run.json").read_text())
    assert record["variant"] == "flux-schnell" and record["rollout"] == "the main pass's output"
    assert (
        record["config"]["soar"]["num_sampling_steps"] == 4 and record["config"]["validation"]["steps"] == 4
    )
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "samples").rglob("*.png"))  # the final validation sampled with schnell's settings
    from soar_lite import app_runs

    assert app_runs.sampler_settings(out) == (4, 0.0)  # what the app's Compare tab starts from


def _random_flux_lora(
    transformer, modules: list[str], rank: int = 3, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        linear = transformer.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g)
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=g)
    return state


FLUX_LORA_MODULES = [
    *(f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
      "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
    *(f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
]  # fmt: skip


def test_kohya_flux_export_matches_the_fused_bfl_layout():
    """kohya's FLUX file, read as the format says (update = up @ down * alpha / rank on BFL's fused
    modules: qkv = [q; k; v], single linear1 = [q; k; v; mlp_in]), applies exactly the diffusers
    LoRA's per-projection updates; a single block without proj_mlp gets zero MLP rows."""
    from soar_lite.export import from_kohya_flux, to_kohya_flux
    from soar_lite.toy.tiny_flux import tiny_flux_transformer

    model = tiny_flux_transformer(0, num_single_layers=2)
    modules = [
        *FLUX_LORA_MODULES,
        "single_transformer_blocks.1.attn.to_q",
        "single_transformer_blocks.1.attn.to_v",
    ]
    state = _random_flux_lora(model, modules)
    kohya = to_kohya_flux(state, strength=0.5)

    def delta(name: str) -> torch.Tensor:
        return 0.5 * state[f"transformer.{name}.lora_B.weight"] @ state[f"transformer.{name}.lora_A.weight"]

    def applied(name: str) -> torch.Tensor:
        down, up = kohya[f"lora_unet_{name}.lora_down.weight"], kohya[f"lora_unet_{name}.lora_up.weight"]
        return up @ down * float(kohya[f"lora_unet_{name}.alpha"]) / down.shape[0]

    d = "transformer_blocks.0."
    expected = {
        "double_blocks_0_img_attn_qkv": torch.cat(
            [delta(d + "attn.to_q"), delta(d + "attn.to_k"), delta(d + "attn.to_v")]
        ),
        "double_blocks_0_txt_attn_qkv": torch.cat(
            [delta(d + "attn.add_q_proj"), delta(d + "attn.add_k_proj"), delta(d + "attn.add_v_proj")]
        ),
        "double_blocks_0_img_attn_proj": delta(d + "attn.to_out.0"),
        "double_blocks_0_txt_attn_proj": delta(d + "attn.to_add_out"),
        "double_blocks_0_img_mlp_0": delta(d + "ff.net.0.proj"),
        "double_blocks_0_img_mlp_2": delta(d + "ff.net.2"),
        "double_blocks_0_txt_mlp_0": delta(d + "ff_context.net.0.proj"),
        "double_blocks_0_txt_mlp_2": delta(d + "ff_context.net.2"),
    }
    s0, s1 = "single_transformer_blocks.0.", "single_transformer_blocks.1."
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    expected["single_blocks_0_linear1"] = torch.cat(
        [delta(s0 + "attn.to_q"), delta(s0 + "attn.to_k"), delta(s0 + "attn.to_v"), delta(s0 + "proj_mlp")]
    )
    zeros = torch.zeros(hidden, hidden)
    expected["single_blocks_1_linear1"] = torch.cat(
        [delta(s1 + "attn.to_q"), zeros, delta(s1 + "attn.to_v"), torch.zeros(4 * hidden, hidden)]
    )
    assert {k.split(".")[0].removeprefix("lora_unet_") for k in kohya} == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(applied(name), want, rtol=1e-5, atol=1e-5)
    back = from_kohya_flux(kohya)  # and read back: every projection's update again, none invented
    assert {k for k in back if k.endswith("lora_A.weight")} == {
        f"transformer.{m}.lora_A.weight" for m in modules
    }
    for name in modules:
        got = back[f"transformer.{name}.lora_B.weight"] @ back[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(got, delta(name), rtol=1e-5, atol=1e-5)


def test_kohya_flux_file_loads_in_diffusers_to_the_same_weights(flux_dev, tmp_path):
    """diffusers' own kohya-FLUX converter (load_lora_weights) reads the exported file to W + B A.

    Double blocks only: diffusers' converter hard-codes FLUX.1's real widths for single blocks'
    linear1, which a tiny model cannot have (the layout test above covers them)."""
    from diffusers import FluxPipeline

    from soar_lite.export import export_lora
    from soar_lite.lora import atomic_save

    pipe = FluxPipeline.from_pretrained(str(flux_dev))
    modules = [m for m in FLUX_LORA_MODULES if m.startswith("transformer_blocks.")]
    state = _random_flux_lora(pipe.transformer, modules, seed=1)
    note = {"format": "pt", "soar_lite": json.dumps({"family": "flux"})}  # as save_lora writes it
    atomic_save(state, tmp_path / "pytorch_lora_weights.safetensors", note)
    kohya = export_lora(tmp_path, "kohya", tmp_path / "kohya.safetensors")
    assert all(k.startswith("lora_unet_double_blocks_0_") for k in load_file(str(kohya)))
    base = {m: pipe.transformer.get_submodule(m).weight.detach().clone() for m in modules}
    pipe.load_lora_weights(str(kohya))
    pipe.fuse_lora()
    for m in modules:
        delta = state[f"transformer.{m}.lora_B.weight"] @ state[f"transformer.{m}.lora_A.weight"]
        torch.testing.assert_close(
            pipe.transformer.get_submodule(m).base_layer.weight, base[m] + delta, rtol=1e-4, atol=1e-4
        )


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "torchao-int8"])
def test_quantized_base_trains_a_step_on_cpu(flux_dev, quant):
    fam = _family(flux_dev, text_encoders=False, vae=False, quant=quant)
    from soar_lite import lora

    params = lora.add_lora(
        fam.transformer, LoraConfig(rank=4, alpha=4.0, targets=list(fam.default_lora_targets))
    )
    z0, cond = _batch()
    cfg = SoarConfig(lambda_aux=1.0, trajectory_length=2)
    rollout = fam.rollout(fam.transformer, config.TrainConfig(soar=cfg))
    report = soar_loss(fam.velocity(fam.transformer), z0, cond, None, fam.noise_grid(), cfg, rollout=rollout,
                       draws=_draws(cfg, z0), backward=lambda t, last: t.backward())  # fmt: skip
    assert torch.isfinite(report.loss) and all(p.grad is not None for p in params)


def test_one_size_rule_for_every_family(flux_dev, tiny_model_dir, tmp_path):
    """Unset sizes come from the folder's soar_lite.json, else the family's native ones (one rule)."""
    import shutil

    assert families.native_resolution(flux_dev) == 32 and families.text_length(flux_dev) == 8
    assert families.native_resolution(tiny_model_dir) == 32 and families.text_length(tiny_model_dir) == 4
    bare = tmp_path / "flux-bare"
    shutil.copytree(flux_dev, bare)
    (bare / "soar_lite.json").unlink()
    assert families.native_resolution(bare) == 1024 and families.text_length(bare) == 512
    (bare / "soar_lite.json").write_text('{"resolution": "big"}')
    with pytest.raises(config.UserError, match="non-integer"):
        families.native_resolution(bare)


def test_flux_per_term_backward_memory_is_flat_in_k(flux_dev):
    """Through the FLUX velocity (packing, embedded guidance): per-term backward keeps one forward's
    saved activations for any K, while the joint backward's grow with K (saved-tensor meter)."""
    from soar_lite.bench.step import SavedTensorMeter

    fam, params = _lora_model(flux_dev)
    z0, cond = _batch()
    grid = fam.noise_grid()

    def peak(k: int, per_term: bool, lam: float = 1.0) -> int:
        cfg = SoarConfig(lambda_aux=lam, trajectory_length=k)
        rollout = fam.rollout(fam.transformer, config.TrainConfig(soar=cfg))
        meter = SavedTensorMeter(fam.transformer.parameters())
        with meter.hooks():
            backward = (lambda t, last: t.backward()) if per_term else None
            report = soar_loss(fam.velocity(fam.transformer), z0, cond, None, grid, cfg, rollout=rollout,
                               draws=_draws(cfg, z0), backward=backward)  # fmt: skip
            if not per_term:
                report.loss.backward()
            del report
        _grads(params)
        return meter.peak

    sft = peak(4, True, lam=0.0)
    assert peak(1, True) <= 1.05 * sft and peak(4, True) <= 1.05 * sft
    assert peak(4, False) >= 4 * sft


@pytest.mark.slow
def test_flux_resume_gives_the_same_lora_as_straight_training(flux_dev, tiny_data_dir, tmp_path):
    """FLUX.1-dev on the NF4 preset: 4 steps straight == 2, Ctrl-C (checkpoint), --resume latest, 2."""
    from tests.conftest import ctrl_c_at

    knobs = ("steps=4", "objective=soar", "lr_scheduler=cosine", "validation.num_prompts=0",
             f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert _train(flux_dev, tiny_data_dir, tmp_path / "a", *knobs) == 0
    straight = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    with ctrl_c_at(2):
        assert _train(flux_dev, tiny_data_dir, tmp_path / "b", *knobs) == 2  # "interrupted ... --resume"
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()
    assert _train(flux_dev, tiny_data_dir, tmp_path / "b", *knobs, "--resume", "latest") == 0
    resumed = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
