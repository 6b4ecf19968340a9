"""The CLI: bad input is one line on stderr and exit code 2, never a traceback; presets list and show."""

from __future__ import annotations

import re

import pytest

from soar_lite.cli import main
from soar_lite.errors import UserError


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "lrr=1"], "unknown setting 'lrr' (did you mean lr?)"),
        (["train", "objective=dpo"], "choose one of: sft, soar, both"),
        (["train", "--preset", "nope"], "unknown preset 'nope'; choose one of:"),
        (["train", "steps=-3"], "steps=-3 must be > 0"),
        (
            ["train", "--data", "/no/such/folder", "--model", "/no/such/model", "--output", "{tmp}/r"],
            "does not",
        ),
        (["train", "--model", "/tmp", "--output", "{tmp}/r"], "is this a diffusers SD3 pipeline folder?"),
        (["presets", "nope"], "unknown preset 'nope'"),
        (["plan", "--model", "/no/such"], "no transformer config"),
        (["bench", "step", "nonsense"], "is not key=value"),
        (["train", "--vram", "0"], "--vram 0: the GPU's memory in GB"),
        (["plan", "--vram", "-2"], "--vram -2: the GPU's memory in GB"),
        (["cache", "--prune", "--older-than", "-5"], "--older-than -5: a number of days"),
        (["caption", "--data", "/no/such/folder"], "is not a folder of images"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("soar-lite: error: ") and "\n" not in err
    assert message in err


def test_resume_without_checkpoint_says_so(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    # a folder with no run at all (a run killed before its first checkpoint starts again instead:
    # tests/test_run_safety.py)
    (tmp_path / "r").mkdir()
    code = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_data_dir),
            "--output",
            str(tmp_path / "r"),
            "--resume",
            "latest",
            "--quiet",
            "steps=1",
            "validation.num_prompts=0",
        ]
    )
    assert code == 2
    assert "no complete checkpoint under" in capsys.readouterr().err


def test_presets_lists_every_tier_and_shows_one_resolved(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in ("cpu-tiny", "8gb", "12gb", "16gb", "24gb", "48gb"):
        assert name in listing
    assert main(["presets", "24gb", "rank=8"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("soar-lite train --preset 24gb") and '"rank": 8' in shown


def test_presets_keys_lists_full_paths(capsys):
    assert main(["presets", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert "optim.lr" in keys and "soar.trajectory_length" in keys and "lora.rank" in keys


def test_plan_prints_a_breakdown_and_verdict(capsys):
    assert main(["plan", "--preset", "24gb", "--model", "sd3.5-large"]) == 0
    out = capsys.readouterr().out
    assert "base weights (nf4" in out and "activations" in out and "fits a 24 GB card" in out
    assert "cache stage" in out and "encoder_offload=auto -> none" in out


def test_plan_for_a_custom_budget_says_what_to_change(capsys):
    assert main(["plan", "--preset", "16gb", "--model", "sd3.5-large", "--vram", "12"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit a 12 GB card" in out
    assert "encoder_offload=auto -> model" in out
    assert re.search(r"fits 12 GB with: .*quant=int8.*\(estimate [\d.]+ GiB\)", out)


def test_cache_info_and_prune_print_one_summary(tmp_path, capsys):
    assert main(["cache", "--info", "--output", str(tmp_path / "empty-cache")]) == 0
    assert capsys.readouterr().out.startswith("cache: 0 shards, 0.00 GB; 0 dataset manifests")
    assert main(["cache", "--prune", "--older-than", "0", "--output", str(tmp_path / "empty-cache")]) == 0
    assert "pruned 0 dataset manifests; 0 shards" in capsys.readouterr().out


def test_train_fits_a_given_vram_before_any_work(capsys, tmp_path, monkeypatch):
    import soar_lite.train as train_module

    seen = {}
    monkeypatch.setattr(
        train_module, "train", lambda cfg, output, **kw: seen.setdefault("cfg", cfg) and output
    )
    args = [
        "train",
        "--preset",
        "16gb",
        "--model",
        "sd3.5-large",
        "--vram",
        "16",
        "--output",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    assert "using quant=int8" in capsys.readouterr().out and seen["cfg"].model.quant == "int8"
    if not __import__("torch").cuda.is_available():
        assert main(["train", "--preset", "auto"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_compare_run_takes_every_arm_the_run_config_names(tmp_path):
    """--run RUN: base then each arm of an objective list, in its order; a missing arm is named."""
    import yaml

    from soar_lite import cli

    run = tmp_path / "run"
    for arm in ("sft", "scheduled", "soar"):
        (run / arm).mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": "sft,scheduled,soar"}), encoding="utf-8")
    args = cli.build_parser().parse_args(["compare", "--run", str(run)])
    assert cli._arms(args) == {"base": None, **{a: str(run / a) for a in ("sft", "scheduled", "soar")}}
    (run / "soar").rmdir()
    with pytest.raises(UserError, match="has no soar/ folder"):
        cli._arms(args)
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": "soar"}), encoding="utf-8")
    with pytest.raises(UserError, match="not a multi-arm run"):
        cli._arms(args)


def test_plan_says_whether_the_ram_peak_fits_this_machine(capsys, monkeypatch):
    """qwen-image-16gb: the cache stage loads the ~15.4 GiB Qwen2.5-VL into RAM (~17 GiB planned),
    more than the swapped blocks' ~5.7 GiB while loading: the verdict names the larger."""
    from soar_lite import doctor

    monkeypatch.setattr(doctor, "system_memory", lambda: (64.0, 60.0))
    assert main(["plan", "--preset", "qwen-image-16gb"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("system RAM:"))
    assert "fits this machine's 64.0 GiB" in line and "text encoders" in line
    monkeypatch.setattr(doctor, "system_memory", lambda: (16.0, 12.0))
    assert main(["plan", "--preset", "qwen-image-16gb"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("system RAM:"))
    assert "does NOT fit this machine's 16.0 GiB" in line
    assert "cache elsewhere" in line  # the encoders, not the swap, are the peak here
    monkeypatch.setattr(doctor, "system_memory", lambda: (6.0, 5.0))
    assert main(["plan", "--preset", "flux-8gb", "--model", "flux.1-dev"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit this machine's 6.0 GiB" in out
