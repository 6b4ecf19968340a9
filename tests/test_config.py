"""Config: every shipped preset validates; short keys resolve; bad input is a one-line UserError."""

from __future__ import annotations

import re

import pytest

from soar_lite import config
from soar_lite.errors import UserError


@pytest.mark.parametrize("name", config.preset_names())
def test_every_preset_loads_and_opens_with_command_and_hardware(name: str) -> None:
    cfg = config.load_config(name)
    header = config.preset_header(name)
    assert header.splitlines()[0].startswith(f"soar-lite train --preset {name}")
    assert "Hardware:" in header
    assert all(name in ("sft", "soar", "scheduled") for name in cfg.objectives)


def test_required_tiers_are_shipped() -> None:
    assert {"cpu-tiny", "8gb", "12gb", "16gb", "24gb", "48gb"} <= set(config.preset_names())


def test_gpu_presets_state_an_estimate_and_use_gpu_features() -> None:
    for name in ("8gb", "12gb", "16gb", "24gb", "48gb"):
        cfg = config.load_config(name)
        assert "Planner estimate" in config.preset_header(name)
        assert cfg.model.gradient_checkpointing and cfg.mixed_precision == "bf16"


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("steps", "steps"),
        ("seed", "seed"),
        ("lr", "optim.lr"),
        ("rank", "lora.rank"),
        ("lambda_aux", "soar.lambda_aux"),
        ("trajectory_length", "soar.trajectory_length"),
        ("resolution", "data.resolution"),
        ("objective", "objective"),
        ("optim.lr", "optim.lr"),
    ],
)
def test_short_keys_resolve_whatever_the_nesting(key: str, path: str) -> None:
    assert config.resolve_key(key) == path


def test_overrides_apply_and_convert_types() -> None:
    cfg = config.load_config(
        "cpu-tiny",
        [
            "lr=3e-4",
            "rank=4",
            "objective=sft",
            "steps=7",
            "gradient_checkpointing=true",
            "lora.targets=to_q,to_k",
        ],
    )
    assert (cfg.optim.lr, cfg.lora.rank, cfg.objective, cfg.steps) == (3e-4, 4, "sft", 7)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.lora.targets == ["to_q", "to_k"]
    assert cfg.effective_lambda_aux == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lrr=1", "unknown setting 'lrr' (did you mean lr?)"),
        ("objective=dpo", "choose one of: sft, soar, both, scheduled"),
        ("objective=sft,dpo", "or a comma list of them"),
        ("objective=sft,sft", "names an objective twice"),
        ("reflexflow.adr_weight=-1", "reflexflow.adr_weight=-1.0 must be >= 0"),
        ("scheduled.rollout_probability=1.5", "must be in [0.0, 1.0]"),
        ("scheduled.rollout_steps=-1", "must be >= 0"),
        ("steps=abc", "steps='abc' is not a valid int"),
        ("steps=0", "steps=0 must be > 0"),
        ("steps=1.5", "not a valid int"),
        ("quant=fp4", "choose one of: none, nf4, int8, torchao-int8, torchao-fp8"),
        ("sde_rollout_type=ddim", "choose one of: simple, sde, flow_sde, cps"),
        ("gradient_checkpointing=maybe", "not a valid bool"),
        ("path=x", "ambiguous"),
        ("steps", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        config.load_config("cpu-tiny", [override])


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(UserError, match=r"unknown preset 'nope'; choose one of: .*cpu-tiny"):
        config.load_config("nope")


def test_preset_file_keys_must_be_full_and_known(tmp_path) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(UserError, match="unknown setting"):
        config.load_config(str(bad))
    short = tmp_path / "short.yaml"
    short.write_text("lr: 1.0e-4\n")
    with pytest.raises(UserError, match=re.escape("must be written in full, as 'optim.lr'")):
        config.load_config(str(short))


def test_lora_dropout_with_main_pass_reuse_is_refused() -> None:
    with pytest.raises(UserError, match="reuse_main_pass"):
        config.load_config("cpu-tiny", ["lora.dropout=0.1"])
    cfg = config.load_config("cpu-tiny", ["lora.dropout=0.1", "reuse_main_pass=false"])
    assert cfg.lora.dropout == 0.1
