"""sample / compare on the untrained tiny pipeline: reproducible per (prompt, seed), settings in the PNGs,
LoRA strength honoured, labelled grid; the CLI; and the grid written after an objective=both run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from soar_lite.cli import main
from soar_lite.config import LoraConfig
from soar_lite.errors import UserError
from soar_lite.lora import add_lora, save_lora
from soar_lite.sample import compare, make_grid, sample

PROMPTS = ["a red circle at the top left", "a blue square at the center"]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random, clearly non-zero LoRA for the tiny pipeline saved as a soar-lite run folder."""
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    transformer = load_tiny_pipeline(tiny_model_dir).transformer
    cfg = LoraConfig(rank=4, alpha=4.0)
    torch.manual_seed(0)
    for p in add_lora(transformer, cfg):
        p.data.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("lora")
    save_lora(transformer, cfg, folder, {})
    (folder / "soar_lite_run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    return folder


def test_sample_writes_pngs_with_settings_and_is_reproducible_per_prompt_and_seed(tiny_model_dir, tmp_path):
    results = sample(str(tiny_model_dir), PROMPTS, seeds=[0, 1], steps=2, output=tmp_path, batch_size=4)
    assert [(r.prompt, r.seed) for r in results] == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert all(r.image.size == (32, 32) for r in results)  # the model folder's own resolution
    with Image.open(tmp_path / "p01-s1.png") as image:
        meta = dict(image.text)
    assert meta["prompt"] == PROMPTS[1] and meta["seed"] == "1" and meta["steps"] == "2"
    assert meta["cfg"] == "4.5" and meta["size"] == "32x32" and meta["model"] == str(tiny_model_dir)
    assert json.loads(meta["loras"]) == [] and "Seed: 1" in meta["parameters"]
    # The same (prompt, seed) alone, in a batch of one, gives the same image as inside the batch.
    alone = sample(str(tiny_model_dir), [PROMPTS[1]], seeds=[1], steps=2)[0]
    assert np.abs(_pixels(alone.image) - _pixels(results[3].image)).max() <= 1
    assert np.abs(_pixels(results[0].image) - _pixels(results[1].image)).max() > 0  # seeds differ


def test_lora_strength_is_honoured(tiny_model_dir, lora_dir, tmp_path):
    kwargs = dict(seeds=[0], steps=2)
    base = sample(str(tiny_model_dir), PROMPTS[:1], **kwargs)[0].image
    zero = sample(str(tiny_model_dir), PROMPTS[:1], loras=[(str(lora_dir), 0.0)], **kwargs)[0].image
    full = sample(str(tiny_model_dir), PROMPTS[:1], loras=[(str(lora_dir), 1.0)], output=tmp_path, **kwargs)
    assert np.abs(_pixels(zero) - _pixels(base)).max() <= 1
    assert np.abs(_pixels(full[0].image) - _pixels(base)).max() > 5
    with Image.open(full[0].path) as image:
        assert json.loads(image.text["loras"]) == [[str(lora_dir), 1.0]]


def test_compare_writes_labelled_grid_and_single_images(tiny_model_dir, lora_dir, tmp_path):
    arms = {"base": None, "sft": str(lora_dir), "soar": str(lora_dir)}
    result = compare(str(tiny_model_dir), arms, PROMPTS, [0, 1], steps=2, output=tmp_path, batch_size=4)
    assert result.grid == tmp_path / "grid.png"
    assert list(result.images) == ["base", "sft", "soar"]
    assert all(len(paths) == 4 and all(p.is_file() for p in paths) for paths in result.images.values())
    with Image.open(result.grid) as grid:
        # 4 rows (2 prompts x 2 seeds) of 3 columns, 32 px images shown at 128 px, plus labels.
        assert grid.width > 3 * 128 and grid.height > 4 * 128
    same = [Image.open(result.images[a][2]) for a in ("sft", "soar")]
    assert np.array_equal(_pixels(same[0]), _pixels(same[1]))  # same LoRA, same seed: same image
    base = sample(str(tiny_model_dir), PROMPTS, seeds=[0, 1], steps=2)
    assert np.abs(_pixels(Image.open(result.images["base"][2])) - _pixels(base[2].image)).max() <= 1


def test_make_grid_places_cells_after_the_label_column():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    grid = make_grid(
        [[red, blue]], ["a long prompt that has to wrap over lines"], ["one", "two"], label_width=100
    )
    arr = np.asarray(grid)
    assert grid.size == (100 + 2 * (128 + 4) + 4, arr.shape[0])
    row = arr[-70]
    assert (row[104 + 10] == [255, 0, 0]).all() and (row[104 + 132 + 10] == [0, 0, 255]).all()
    assert (arr[:, :100] < 128).any()  # the label was drawn


def test_cli_sample_and_compare(tiny_model_dir, lora_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    code = main(
        ["sample", "--prompts-file", str(prompts), "--lora", f"{lora_dir}:0.5", "--seeds", "3",
         "--steps", "2", "--output", str(tmp_path / "s")]
    )  # fmt: skip
    assert code == 0 and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["p00-s3.png", "p01-s3.png"]
    with Image.open(tmp_path / "s" / "p00-s3.png") as image:  # --model came from the LoRA's run record
        assert image.text["model"] == str(tiny_model_dir)
    code = main(
        ["compare", "--arm", f"mine={lora_dir}", "--prompt", PROMPTS[0], "--steps", "2",
         "--output", str(tmp_path / "c")]
    )  # fmt: skip
    assert code == 0 and (tmp_path / "c" / "grid.png").is_file() and (tmp_path / "c" / "mine").is_dir()
    assert main(["sample", "--steps", "2"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["compare", "--prompt", "x", "--model", str(tiny_model_dir)]) == 2


def test_bad_size_is_a_clear_error(tiny_model_dir):
    with pytest.raises(UserError, match="multiples of"):
        sample(str(tiny_model_dir), PROMPTS[:1], steps=1, height=30, width=32)


@pytest.mark.slow
def test_objective_both_writes_the_comparison_grid(tiny_model_dir, tiny_data_dir, tmp_path):
    from soar_lite import config, train
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(
        **{
            "model.path": tiny_model_dir,
            "data.path": tiny_data_dir,
            "objective": "both",
            "steps": 1,
            "validation.num_prompts": 2,
            "validation.steps": 2,
        }
    )
    out = train.train(config.load_config("cpu-tiny", overrides), tmp_path / "both", progress=False)
    grid = out / "compare" / "grid.png"
    assert grid.is_file()
    assert {p.name for p in (out / "compare").iterdir()} == {"grid.png", "base", "sft", "soar"}
    assert len(list((out / "compare" / "soar").glob("*.png"))) == 2


@pytest.mark.slow
def test_an_objective_list_compares_every_arm_next_to_base(tiny_model_dir, tiny_data_dir, tmp_path):
    from PIL import Image

    from soar_lite import app_runs, config, train
    from tests.conftest import tiny_overrides

    knobs = {"objective": "sft,scheduled,soar", "steps": 1, "validation.num_prompts": 1}
    knobs["validation.steps"] = 2
    overrides = tiny_overrides(**{"model.path": tiny_model_dir, "data.path": tiny_data_dir, **knobs})
    out = train.train(config.load_config("cpu-tiny", overrides), tmp_path / "arms", progress=False)
    assert {p.name for p in (out / "compare").iterdir()} == {"grid.png", "base", "sft", "scheduled", "soar"}
    two = train.train(
        config.load_config("cpu-tiny", [*overrides, "objective=both"]), tmp_path / "two", progress=False
    )
    wide, narrow = Image.open(out / "compare" / "grid.png"), Image.open(two / "compare" / "grid.png")
    assert wide.height == narrow.height and wide.width > narrow.width  # one more column: 4 arms, not 3
    assert config.saved_objective(out) == "sft,scheduled,soar"
    assert [label for label, _ in app_runs.run_arms(out)] == ["sft", "scheduled", "soar"]
