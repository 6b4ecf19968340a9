"""The rule-based checker reads real toy shapes back; the distances behave; the quality benchmark runs
end to end on the untrained tiny pipeline and writes its JSON and grid (the numbers are the README's job)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from soar_lite.toy import checker
from soar_lite.toy.shapes import BACKGROUND, draw_shape, shapes_dataset


def test_checker_reads_every_attribute_of_real_drawn_shapes():
    data = shapes_dataset(600, seed=99, size=32)
    acc = checker.accuracy([image for image, _, _ in data], [caption for _, caption, _ in data])
    assert acc == {"color": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    bigger = shapes_dataset(60, seed=5, size=64)  # any size: the rules use fractions of the side
    assert checker.accuracy([i for i, _, _ in bigger], [c for _, c, _ in bigger])["all"] == 1.0
    # the colour the base never saw, too (its squares once read as circles: Lanczos spurs)
    for size in (32, 64):
        novel = shapes_dataset(300, seed=7, size=size, novel_share=1.0)
        assert {attrs["color"] for _, _, attrs in novel} == {"orange"}
        assert checker.accuracy([i for i, _, _ in novel], [c for _, c, _ in novel])["all"] == 1.0


def test_checker_marks_each_wrong_attribute_and_empty_images():
    image, _ = draw_shape("red", "triangle", "bottom right")
    marks = checker.score(image, "a blue triangle at the bottom right")
    assert marks == {"color": False, "shape": True, "position": True, "all": False}
    marks = checker.score(image, "a red square at the top left")
    assert marks == {"color": True, "shape": False, "position": False, "all": False}
    blank = Image.new("RGB", (32, 32), BACKGROUND)
    assert checker.read_image(blank).color is None
    assert not any(checker.score(blank, "a red circle at the center").values())


def test_checker_ignores_stray_specks():
    image, _ = draw_shape("green", "circle", "top left")
    pixels = np.asarray(image).copy()
    pixels[30, 30] = pixels[2, 30] = (20, 20, 20)  # two dark specks far from the shape
    assert checker.score(Image.fromarray(pixels), "a green circle at the top left")["all"]


def test_distances_are_zero_for_the_same_set_and_grow_with_a_different_one():
    a = [image for image, _, _ in shapes_dataset(200, seed=1)]
    b = [image for image, _, _ in shapes_dataset(200, seed=2)]
    blank = [Image.new("RGB", (32, 32), BACKGROUND)] * 200
    assert checker.histogram_distance(a, a) == 0.0
    assert abs(checker.pixel_fd(a, a)) < 1e-6
    assert checker.histogram_distance(a, b) < checker.histogram_distance(a, blank)
    assert checker.pixel_fd(a, b) < checker.pixel_fd(a, blank)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (20000, 2))
    y = rng.normal(1.0, 2.0, (20000, 2))
    # identity vs 4 I: |mu|^2 = 2, trace terms 2 + 8 - 2 * 2 * 2 = 2 -> 4
    assert checker.frechet_distance(x, y) == pytest.approx(4.0, abs=0.15)


@pytest.mark.slow
def test_quality_benchmark_runs_end_to_end_and_writes_json_grid_and_plot(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from soar_lite.cli import main

    out = tmp_path / "bench" / "quality.json"
    knobs = {
        "model": str(tiny_model_dir),
        "data": str(tiny_data_dir),
        "seeds": "0,1",
        "steps": 1,
        "eval_captions": 3,
        "eval_per_caption": 2,
        "sampler_steps": "2,3",
        "drift_steps": "2,3",
        "drift_pairs": 4,
        "trajectory_length": 1,
        "batch_size": 4,
        "grid_captions": 2,
    }
    argv = ["bench", "quality", "--output", str(out), "--objectives", "sft,soar,scheduled"]
    assert main([*argv, *(f"{k}={v}" for k, v in knobs.items())]) == 0
    record = json.loads(out.read_text())
    assert record["grid"] == "quality_grid.png" and record["steps_plot"] == "quality_steps.png"
    assert set(record["per_seed"]) == {"0", "1"}
    arms = ["base", "sft", "soar", "scheduled", "sft_equal_time"]
    assert list(record["per_seed"]["0"]) == arms
    assert record["samples_per_arm_and_seed"] == {"novel": 6, "world": 6}
    assert record["equal_time"]["sft_steps"] >= 1
    table = record["summary"]["arms"]
    assert set(table) == set(arms)
    keys = {
        f"{s}.{m}@{n}" for s in ("novel", "world") for m in ("acc_all", "hist_tv", "pixel_fd") for n in (2, 3)
    }
    assert set(table["soar"]) >= keys | {"drift_ratio@3"}
    assert {"mean", "std", "min", "max"} == set(table["soar"]["novel.acc_all@2"])
    paired = record["summary"]["paired_differences"]
    # every pair of trained arms, then each trained arm against the base: 6 + 4
    assert len(paired) == 10 and {
        "soar-sft",
        "scheduled-soar",
        "sft_equal_time-scheduled",
        "soar-base",
    } <= set(paired)
    test = paired["soar-sft"]["novel.acc_all@2"]
    assert {"p", "p_holm", "t", "se", "seeds_a_better"} <= set(test)
    assert test["p_holm"] is None or test["p_holm"] >= (test["p"] or 0.0)
    assert record["real_checker_accuracy"]["novel"]["all"] == 1.0
    assert record["real_checker_accuracy"]["world"]["all"] == 1.0
    with Image.open(out.parent / "quality_grid.png") as grid:
        assert grid.width > 6 * 128  # real + 5 arms
    with Image.open(out.parent / "quality_steps.png") as plot:
        assert plot.width >= 2 * 400  # a panel per eval set


def test_bench_quality_refuses_a_repeated_or_empty_objective_list():
    from soar_lite.bench.quality import QualitySettings

    assert QualitySettings(objectives="sft,soar,scheduled").arms == (
        "base",
        "sft",
        "soar",
        "scheduled",
        "sft_equal_time",
    )
    assert QualitySettings(objectives="both").objectives == ("sft", "soar")
    assert QualitySettings(objectives="sft,scheduled").arms == ("base", "sft", "scheduled")  # no SOAR cost
    for bad in ("sft,sft", "", "sft,sft_equal_time"):
        with pytest.raises(ValueError):
            QualitySettings(objectives=bad)


def test_comparisons_are_every_trained_pair_then_each_against_base():
    from soar_lite.bench.quality import comparisons

    assert comparisons(["base", "sft", "soar", "scheduled"]) == [
        ("soar", "sft"),
        ("scheduled", "sft"),
        ("scheduled", "soar"),
        ("sft", "base"),
        ("soar", "base"),
        ("scheduled", "base"),
    ]
