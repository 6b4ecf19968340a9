"""README's main command on a fresh home: the built-in trained tiny base and shapes, no download.

``soar-lite train --preset cpu-tiny --output DIR`` must write a LoRA that diffusers'
``StableDiffusion3Pipeline.load_lora_weights`` loads and that changes the output at a fixed seed.
This builds the tiny base once for the test session (minutes), so it is marked slow; CI runs it.
"""

from __future__ import annotations

import json

import pytest
import torch

from soar_lite.cli import main

pytestmark = pytest.mark.slow


def test_readme_main_command_trains_a_lora_that_diffusers_loads_and_that_changes_the_output(tmp_path):
    out = tmp_path / "tiny"
    assert main(["train", "--preset", "cpu-tiny", "--output", str(out), "--quiet"]) == 0
    record = json.loads((out / "soar_lite_run.json").read_text())
    assert record["status"] == "done" and record["objective"] == "soar" and record["model_arg"] == "builtin"
    assert sorted((out / "samples").glob("step-*/00.png")), "no validation image was written"

    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline, read_toy_settings

    pipe = load_tiny_pipeline(record["base_model"])
    pipe.set_progress_bar_config(disable=True)
    settings = read_toy_settings(record["base_model"])
    kwargs = dict(
        prompt="a red circle at the top left",
        num_inference_steps=8,
        height=settings["resolution"],
        width=settings["resolution"],
        max_sequence_length=settings["max_sequence_length"],
        output_type="pt",
    )
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (before - after).abs().mean() > 1e-3, "the LoRA loaded but did not change the output"
