"""The built-in base ships with the package (toy/shipped.py): it is the default recipe's build,
intact, unpacked without training, and still draws what its captions ask for."""

from __future__ import annotations

import json

import pytest
import torch

from soar_lite.toy import checker, pretrain, shipped
from soar_lite.toy.shapes import all_captions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_base_is_the_default_recipe():
    manifest = shipped.shipped_manifest()
    assert manifest is not None, "soar_lite/toy/base is missing: python -m soar_lite.toy.shipped"
    # A changed ToyRecipe without a rebuild would silently train for half an hour on first use.
    assert manifest["recipe_key"] == pretrain.ToyRecipe().key()
    assert shipped.damaged_files() == []
    weights = sum(p.stat().st_size for p in shipped.SHIPPED_DIR.rglob("*.safetensors"))
    assert weights < 8 * 2**20  # a few MB of fp16


def test_damaged_file_is_found(tmp_path):
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(shipped.SHIPPED_DIR, copy)
    assert shipped.damaged_files(copy) == []
    with (copy / "transformer" / "config.json").open("a") as fh:
        fh.write(" ")
    assert shipped.damaged_files(copy) == ["transformer/config.json"]


def test_default_base_is_unpacked_not_trained(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the shipped recipe must be unpacked, not trained")

    monkeypatch.setattr(pretrain, "build_tiny_base", fail)
    folder = pretrain.ensure_tiny_base(tmp_path, progress=False)
    assert pretrain.is_complete(folder)
    marker = json.loads((folder / pretrain.COMPLETE_MARKER).read_text())
    assert marker["unpacked_from"].startswith("package")
    from safetensors.torch import load_file

    unpacked = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    packed = load_file(str(shipped.SHIPPED_DIR / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in unpacked.values())
    assert all(torch.equal(unpacked[k], packed[k].float()) for k in packed)


def test_short_recipe_run_still_trains(tmp_path):
    """The recipe itself (not only its shipped result) must still train: 1 vs 60 steps."""
    short = dict(num_images=64, seed=0)
    one = pretrain.build_tiny_base(
        tmp_path / "a", pretrain.ToyRecipe(vae_steps=1, transformer_steps=1, **short), progress=False
    )
    more = pretrain.build_tiny_base(
        tmp_path / "b", pretrain.ToyRecipe(vae_steps=60, transformer_steps=60, **short), progress=False
    )
    assert more["vae_mse"] < 0.5 * one["vae_mse"]
    assert more["flow_matching_loss"] < one["flow_matching_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("sampler_steps", [8, 40])
def test_shipped_base_draws_its_world(tmp_path, sampler_steps):
    """The benchmark base's own target (issue 15): colour, shape and place all right on >= 0.6 of
    the 135 captions at 8 and at 40 sampler steps (real images score 1.0). Measured on the shipped
    base: 0.81 at 8 steps, 0.78-0.86 at 40 (README), so 0.6 leaves room for noise seeds."""
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    pipe = load_tiny_pipeline(pretrain.ensure_tiny_base(tmp_path, progress=False))
    pipe.set_progress_bar_config(disable=True)
    captions = all_captions()
    generators = [torch.Generator().manual_seed(7000 + i) for i in range(len(captions))]
    with torch.no_grad():
        images = pipe(
            captions,
            num_inference_steps=sampler_steps,
            guidance_scale=4.5,
            generator=generators,
            height=32,
            width=32,
            max_sequence_length=4,
        ).images
    acc = checker.accuracy(images, captions)
    assert acc["all"] >= 0.6 and acc["color"] >= 0.95, acc
