"""Block swap: the same loss and LoRA gradient with swap on and off, on tiny SD3 and FLUX transformers.

The CPU "device move" is a clone, and an evicted block holds NaN (``poison=True``): a block that ran
without being swapped in, in its forward or its checkpointed recompute, would turn the loss or a
gradient into NaN. The reference is the same model without swap (diffusers' own forward), through
``soar_loss`` with per-term backward, as training calls it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from soar_lite import lora
from soar_lite.config import LoraConfig, SoarConfig
from soar_lite.errors import UserError
from soar_lite.objective import Draws, NoiseGrid, PathDraws, Rollout, soar_loss
from soar_lite.swap import BlockSwap, blocks_of, frozen_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def _sd3():
    from soar_lite.families.sd3 import sd3_velocity
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    model = tiny_sd3_transformer(0, num_layers=4)
    cond = {"prompt_embeds": torch.randn(3, 5, 64), "pooled_prompt_embeds": torch.randn(3, 64)}
    uncond = {"prompt_embeds": torch.zeros(1, 5, 64), "pooled_prompt_embeds": torch.zeros(1, 64)}
    return model, SD3_TARGETS, cond, uncond, lambda m: (sd3_velocity(m), Rollout("cfg", 4.5))


def _flux():
    from soar_lite.families.flux import LORA_TARGETS, flux_velocity
    from soar_lite.toy.tiny_flux import tiny_flux_transformer

    model = tiny_flux_transformer(0, num_layers=2, num_single_layers=2)
    cond = {"prompt_embeds": torch.randn(3, 5, 32), "pooled_prompt_embeds": torch.randn(3, 32)}
    # FLUX.1-dev: trained at guidance 1, rollout at 3.5 in its own no-grad pass
    return (
        model,
        list(LORA_TARGETS),
        cond,
        None,
        lambda m: (flux_velocity(m, 1.0), Rollout("single", velocity=flux_velocity(m, 3.5))),
    )


def _prepare(model: torch.nn.Module, targets: list[str], quant: str = "none") -> list[torch.nn.Parameter]:
    model.requires_grad_(False)
    if quant != "none":
        from soar_lite.quant import quantize_bnb_linears

        assert quantize_bnb_linears(model, quant, torch.float32) > 0
        model.to("cpu")  # bnb quantizes when moved
    torch.manual_seed(1)
    params = lora.add_lora(model, LoraConfig(rank=4, alpha=4.0, targets=targets))
    for p in params:  # non-zero B: the adapter matters
        p.data.normal_(0, 0.05)
    model.enable_gradient_checkpointing()
    return params


def _step(model, params, cond, uncond, make, device: str = "cpu"):
    velocity, rollout = make(model)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(3, 16, 8, 8, generator=g).to(device)
    cfg = SoarConfig(lambda_aux=1.0, trajectory_length=2, reuse_main_pass=True)
    draws = Draws(torch.randn(z0.shape, generator=g), torch.tensor([0.8123, 0.3456, 0.0123]))
    draws.paths.append(PathDraws(None, torch.rand((2, 3), generator=g)))
    grid = NoiseGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    report = soar_loss(velocity, z0, cond, uncond, grid, cfg, rollout=rollout, draws=draws.to(device),
                       backward=lambda term, last: term.backward())  # fmt: skip
    grads = [p.grad.detach().cpu().clone() for p in params]
    for p in params:
        p.grad = None
    return report.loss.detach().cpu(), grads


def _compare(build, count: int, quant: str = "none") -> BlockSwap:
    model, targets, cond, uncond, make = build()
    twin = copy.deepcopy(model)
    ref_params = _prepare(model, targets, quant)
    params = _prepare(twin, targets, quant)
    trainable_before = [p for p in twin.parameters() if p.requires_grad]
    swap = BlockSwap(twin, count, "cpu", poison=True)
    ref_loss, ref_grads = _step(model, ref_params, cond, uncond, make)
    loss, grads = _step(twin, params, cond, uncond, make)
    assert torch.isfinite(ref_loss) and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # the LoRA parameters are the same objects, never moved: the optimizer keeps seeing them
    assert [p for p in twin.parameters() if p.requires_grad] == trainable_before
    return swap


@pytest.mark.parametrize("build", [_sd3, _flux], ids=["sd3", "flux"])
def test_swap_gives_the_same_loss_and_lora_gradient(build):
    swap = _compare(build, 3)
    # 3 swapped blocks > the window of 2: each pass (main, rollout, K aux, and every recompute) copies
    passes = 2 + 1 + 2 * 2  # main fwd+recompute, one no-grad rollout pass, K=2 aux fwd+recompute
    assert swap.copies >= passes
    biggest = max(frozen_bytes(b.module) for b in swap.swapped.values())
    assert 0 < swap.peak_resident_bytes <= 2 * biggest  # never more than two blocks in flight


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_swap_moves_bnb_quantized_weights_as_they_are(quant):
    swap = _compare(_flux, 4, quant)
    assert swap.copies > 0 and swap.swapped_bytes > 0


def test_poisoned_blocks_would_be_caught_without_the_hooks():
    """The negative control: the exactness above is not vacuous, an evicted block really is NaN."""
    model, targets, cond, uncond, make = _sd3()
    params = _prepare(model, targets)
    swap = BlockSwap(model, 2, "cpu", poison=True)
    for handle in swap.handles:
        handle.remove()
    loss, _ = _step(model, params, cond, uncond, make)
    assert torch.isnan(loss)


def test_swap_all_blocks_and_remove_restores_the_model():
    model, targets, cond, uncond, make = _flux()
    twin = copy.deepcopy(model)
    ref_params, params = _prepare(model, targets), _prepare(twin, targets)
    swap = BlockSwap(twin, len(blocks_of(twin)), "cpu", poison=True)
    loss, _ = _step(twin, params, cond, uncond, make)
    swap.remove()
    after, _ = _step(twin, params, cond, uncond, make)  # no hooks left, every weight back in place
    ref, _ = _step(model, ref_params, cond, uncond, make)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(after, ref, rtol=1e-6, atol=0)


def test_bad_counts_missing_checkpointing_and_too_little_ram_are_one_line_errors(monkeypatch):
    from soar_lite import swap
    from soar_lite.config import build_config

    model, *_ = _sd3()
    with pytest.raises(UserError, match="has 4 blocks"):
        BlockSwap(model, 5, "cpu")
    model.requires_grad_(False)  # a frozen base: what a swap moves
    before = [p.data_ptr() for p in model.parameters()]
    monkeypatch.setattr(swap, "available_ram_bytes", lambda: 1_000_000)  # 1 MB free: 3 blocks are ~7 MB
    with pytest.raises(UserError, match=r"needs 0.0 GiB of system RAM and 0.0 GiB is available"):
        BlockSwap(model, 3, "cpu")
    assert [p.data_ptr() for p in model.parameters()] == before  # refused before anything moved
    with pytest.raises(UserError, match="gradient_checkpointing=true"):
        build_config({}, ["swap_blocks=2"])
    assert build_config({}, ["swap_blocks=2", "gradient_checkpointing=true"]).model.swap_blocks == 2


@pytest.mark.gpu
def test_swap_on_a_gpu_matches_no_swap():
    """On CUDA: the side stream, pinned homes and real copies give the same loss and gradient."""
    model, targets, cond, _, make = _flux()
    twin = copy.deepcopy(model)
    ref_params, params = _prepare(model.cuda(), targets), _prepare(twin.cuda(), targets)
    cond = {k: v.cuda() for k, v in cond.items()}
    BlockSwap(twin, 3, "cuda")
    assert all(p.device.type == "cpu" for p in blocks_of(twin)[-1].parameters() if not p.requires_grad)

    def on_gpu(m, p):
        velocity, rollout = make(m)
        g = torch.Generator().manual_seed(3)
        z0 = torch.randn(3, 16, 8, 8, generator=g).cuda()
        cfg = SoarConfig(lambda_aux=1.0, trajectory_length=2)
        draws = Draws(torch.randn(z0.shape, generator=g), torch.tensor([0.8123, 0.3456, 0.0123]))
        draws.paths.append(PathDraws(None, torch.rand((2, 3), generator=g)))
        grid = NoiseGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
        report = soar_loss(velocity, z0, cond, None, grid, cfg, rollout=rollout, draws=draws.to("cuda"),
                           backward=lambda term, last: term.backward())  # fmt: skip
        return report.loss.detach().cpu(), [q.grad.cpu() for q in p]

    ref_loss, ref_grads = on_gpu(model, ref_params)
    loss, grads = on_gpu(twin, params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_training_with_swap_writes_the_same_lora(tiny_model_dir, tiny_data_dir, tmp_path):
    """train() end to end: swap on or off, the saved LoRA is the same (build_run's wiring)."""
    from safetensors.torch import load_file

    from soar_lite import config, train
    from tests.conftest import tiny_overrides

    files = []
    for name, swap in (("off", 0), ("on", 1)):
        overrides = tiny_overrides(**{"model.path": tiny_model_dir, "data.path": tiny_data_dir, "steps": 2})
        cfg = config.build_config({}, [*overrides, "gradient_checkpointing=true", f"swap_blocks={swap}"])
        out = train.train(cfg, tmp_path / name, progress=False)
        files.append(load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors")))
        assert out is not None
    assert files[0].keys() == files[1].keys()
    for key in files[0]:
        torch.testing.assert_close(files[1][key], files[0][key], rtol=1e-5, atol=1e-7)
    overrides = tiny_overrides(**{"model.path": tiny_model_dir, "data.path": tiny_data_dir})
    cfg = config.build_config({}, [*overrides, "gradient_checkpointing=true", "swap_blocks=3"])
    with pytest.raises(UserError, match="has 2 blocks"):  # build_run did install the swap
        train.train(cfg, tmp_path / "too-many", progress=False)


# ----------------------------------------------------------------------------- the planner


@pytest.fixture(scope="module")
def flux_config_dir(tmp_path_factory: pytest.TempPathFactory):
    """A folder with only a tiny FLUX transformer config (2 double + 3 single blocks): what the
    planner reads, and the model it describes, to count its real blocks' bytes."""
    from soar_lite.toy.tiny_flux import tiny_flux_transformer

    model = tiny_flux_transformer(0, num_layers=2, num_single_layers=3)
    folder = tmp_path_factory.mktemp("flux-config")
    model.save_config(folder / "transformer")
    return folder, model


def test_planner_counts_the_swapped_blocks(flux_config_dir):
    from soar_lite.config import build_config
    from soar_lite.plan import CUDA_CONTEXT_GB, GIB, PROCESS_RAM_GB, plan

    folder, model = flux_config_dir
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    sizes = [sum(p.numel() * 4 for p in b.parameters()) for b in blocks]  # float32, no quantization
    common = ["gradient_checkpointing=true", "trajectory_length=2", "gradient_accumulation=2"]
    common.append("resolution=64")
    off = plan(build_config({}, common), str(folder), 8)
    on = plan(build_config({}, [*common, "swap_blocks=4"]), str(folder), 8)
    swapped = sum(sizes[-4:])
    in_flight = sum(sorted(sizes[-4:])[-2:])
    assert on.swap.swapped_gb == pytest.approx(swapped / GIB, rel=1e-9)
    assert on.swap.in_flight_gb == pytest.approx(in_flight / GIB, rel=1e-9)
    assert on.total == pytest.approx(off.total - (swapped - in_flight) / GIB, rel=1e-9)
    # per micro-batch: (main + K aux) x (forward + recompute) + the rollout's pass at guidance 3.5
    rounds = (2 * (1 + 2) + 1) * 2
    assert on.swap.copies_per_step == 4 * rounds
    assert on.swap.pcie_gb_per_step == pytest.approx(swapped * rounds / GIB, rel=1e-9)
    assert on.swap.ram_gb == pytest.approx(PROCESS_RAM_GB + swapped / GIB, rel=1e-9)
    # loading block by block: the GPU holds all but the swapped blocks (nothing to quantize here);
    # RAM the swapped blocks plus the largest block while it is read
    base = next(v for k, v in on.parts.items() if k.startswith("base weights"))
    assert on.swap.load_gb == pytest.approx(CUDA_CONTEXT_GB + base - swapped / GIB, rel=1e-9)
    assert on.swap.load_ram_gb == pytest.approx(PROCESS_RAM_GB + (swapped + max(sizes)) / GIB, rel=1e-9)
    assert "PCIe traffic" in on.render() and "block swap" not in off.render()
    kept = plan(build_config({}, [*common, "swap_blocks=2"]), str(folder), 8)  # two stay resident
    assert kept.total == pytest.approx(off.total, rel=1e-9) and kept.swap.copies_per_step == 0


def test_vram_fitting_swaps_the_fewest_blocks_after_quantization():
    from soar_lite.config import load_config
    from soar_lite.plan import plan, suggest

    changes, fitted = suggest("flux-12gb", [], "flux.1-dev", 8)
    assert "quant=nf4" in changes and fitted.fits
    n = int(next(c for c in changes if c.startswith("swap_blocks=")).partition("=")[2])
    assert not any(c.startswith("resolution=") for c in changes)  # swap comes before resolution
    fewer = plan(load_config("flux-12gb", [*changes, f"swap_blocks={n - 1}"]), "flux.1-dev", 8)
    assert not fewer.fits  # n is the fewest


def test_swap_blocks_auto_picks_the_fewest_that_fit_and_says_so(capsys):
    """`swap_blocks=auto` becomes a number: the plan fits with it and not with one block fewer."""
    from soar_lite.cli import main
    from soar_lite.config import load_config
    from soar_lite.errors import UserError
    from soar_lite.plan import plan, resolve_swap_auto

    overrides, notes = resolve_swap_auto("flux-12gb", ["swap_blocks=auto", "quant=nf4"], 8, "flux.1-dev")
    assert "swap_blocks=auto" not in overrides and "quant=nf4" in overrides
    n = int(next(o for o in overrides if o.startswith("swap_blocks=")).partition("=")[2])
    assert n > 0 and f"{n} of " in notes[0]
    assert plan(load_config("flux-12gb", overrides), "flux.1-dev", 8).fits
    fewer = [*overrides, f"swap_blocks={n - 1}"]
    assert not plan(load_config("flux-12gb", fewer), "flux.1-dev", 8).fits
    # a card it fits without swapping: 0; overrides without auto come back as they were
    assert resolve_swap_auto("flux-12gb", ["model.swap_blocks=auto"], 80, "flux.1-dev")[0] == [
        "swap_blocks=0"
    ]
    assert resolve_swap_auto("flux-12gb", ["steps=3"], None) == (["steps=3"], [])
    # nothing to plan for on a machine without a GPU, and even every block swapped is not enough
    with pytest.raises(UserError, match="--vram"):
        resolve_swap_auto("flux-12gb", ["swap_blocks=auto"], None, "flux.1-dev")
    with pytest.raises(UserError, match="every block swapped"):
        resolve_swap_auto("flux-12gb", ["swap_blocks=auto", "quant=none"], 1, "flux.1-dev")
    # a preset file or the app cannot hand "auto" to the config: one clear line
    with pytest.raises(UserError, match="chosen by the planner"):
        load_config("flux-12gb", ["swap_blocks=auto"])
    assert (
        main(["plan", "--preset", "flux-12gb", "--model", "flux.1-dev", "--vram", "8", "swap_blocks=auto"])
        == 0
    )
    assert f"swap_blocks=auto: {n} of" in capsys.readouterr().out
