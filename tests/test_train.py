"""The loop end to end on a tiny SD3 pipeline: LoRA contract, resume equivalence, both arms, cache reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soar_lite import config, train
from soar_lite.errors import UserError
from soar_lite.lora import LORA_FILE
from tests.conftest import ctrl_c_at, tiny_overrides

pytestmark = pytest.mark.slow


def run(tiny_model_dir: Path, tiny_data_dir: Path, output: Path, resume: str | None = None, **extra) -> Path:
    overrides = tiny_overrides(**{"model.path": tiny_model_dir, "data.path": tiny_data_dir, **extra})
    cfg = config.load_config("cpu-tiny", overrides)
    return train.train(cfg, output, resume=resume, progress=False)


def _pipe(model_dir: Path):
    from soar_lite.toy.tiny_sd3 import load_tiny_pipeline

    pipe = load_tiny_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe) -> torch.Tensor:
    out = pipe(
        "a red circle at the top left",
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    return out.images


def test_lora_file_loads_in_diffusers_fuses_to_base_plus_BA_and_changes_output(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = run(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path / "run",
        **{"validation.num_prompts": 1, "validation.steps": 2},
    )
    weights = load_file(str(out / LORA_FILE))
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    assert any(".add_q_proj." in k for k in weights) and any(".to_q." in k for k in weights)
    record = json.loads((out / train.RUN_RECORD).read_text())
    assert record["status"] == "done" and record["steps_done"] == 4 and record["objective"] == "soar"
    assert record["base_model"] == str(tiny_model_dir)
    assert (out / "samples" / "step-000004" / "00.png").is_file()
    assert len((out / train.METRICS).read_text().splitlines()) == 4

    pipe = _pipe(tiny_model_dir)
    before = _sample(pipe)
    base_q = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    pipe.load_lora_weights(str(out / LORA_FILE))
    after = _sample(pipe)
    assert (before - after).abs().max() > 1e-4, "the LoRA loaded but changed nothing"
    pipe.fuse_lora(lora_scale=1.0)
    fused = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach()
    a = weights["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    b = weights["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    torch.testing.assert_close(fused, base_q + b @ a, rtol=1e-5, atol=1e-6)


def test_resume_gives_the_same_lora_as_straight_training(tiny_model_dir, tiny_data_dir, tmp_path):
    """N steps straight == N/2 steps, interrupt (checkpoint), --resume latest, N/2 steps: bit for bit."""
    knobs = {
        "steps": 4,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "num_rollout_paths": 2,
        "sde_rollout_type": "cps",
        "data.cache_dir": tmp_path / "cache",
    }
    straight = load_file(str(run(tiny_model_dir, tiny_data_dir, tmp_path / "a", **knobs) / LORA_FILE))

    with ctrl_c_at(2), pytest.raises(UserError, match="interrupted at step 2: checkpoint saved"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "b", **knobs)
    assert not (tmp_path / "b" / LORA_FILE).exists()
    (tmp_path / "b" / "checkpoints" / ".tmp-step-000003-1").mkdir()  # a half-written later checkpoint
    resumed = load_file(
        str(run(tiny_model_dir, tiny_data_dir, tmp_path / "b", resume="latest", **knobs) / LORA_FILE)
    )
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_checkpoints_are_pruned_to_keep_last_k(tiny_model_dir, tiny_data_dir, tmp_path):
    run(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path / "r",
        steps=5,
        checkpoint_every=1,
        keep_checkpoints=2,
        objective="sft",
    )
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005"]  # the last step is kept too (to extend the run)


def test_earlier_run_is_never_overwritten_silently(tiny_model_dir, tiny_data_dir, tmp_path):
    run(tiny_model_dir, tiny_data_dir, tmp_path / "r", steps=1, objective="sft")
    with pytest.raises(UserError, match="already holds a run: pass --resume latest"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "r", steps=1)


def test_both_arms_share_data_and_seed_and_differ_in_objective(tiny_model_dir, tiny_data_dir, tmp_path):
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "both", objective="both", steps=2)
    sft = json.loads((out / "sft" / train.RUN_RECORD).read_text())
    soar = json.loads((out / "soar" / train.RUN_RECORD).read_text())
    assert (sft["objective"], soar["objective"]) == ("sft", "soar")
    assert sft["config"]["seed"] == soar["config"]["seed"]
    metrics = [json.loads(line) for line in (out / "sft" / train.METRICS).read_text().splitlines()]
    assert all(m["aux_per_sample"] == 0 for m in metrics)
    metrics = [json.loads(line) for line in (out / "soar" / train.METRICS).read_text().splitlines()]
    assert all(m["aux_per_sample"] == 2 for m in metrics)  # K = 2 aux points per sample, ODE path only


def test_a_comma_list_trains_one_arm_per_objective_and_scheduled_at_p0_is_the_sft_arm(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """sft,scheduled,soar: three arms, in order, same seed; scheduled sampling's rollout changes the
    LoRA, and with rollout_probability=0 a scheduled run gives the SFT arm's LoRA bit for bit."""
    knobs = {"steps": 2, "data.cache_dir": tmp_path / "cache", "num_sampling_steps": 4}
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "arms", objective="sft,scheduled,soar", **knobs)
    records = {
        arm: json.loads((out / arm / train.RUN_RECORD).read_text()) for arm in ("sft", "scheduled", "soar")
    }
    assert {arm: r["objective"] for arm, r in records.items()} == {a: a for a in records}
    assert len({r["config"]["seed"] for r in records.values()}) == 1
    assert records["scheduled"]["rollout"].startswith("scheduled sampling: up to 4 Euler steps")
    loras = {arm: load_file(str(out / arm / LORA_FILE)) for arm in records}
    assert any(not torch.equal(loras["sft"][k], loras["scheduled"][k]) for k in loras["sft"])
    p0 = run(tiny_model_dir, tiny_data_dir, tmp_path / "p0", objective="scheduled",
             **{"scheduled.rollout_probability": 0.0}, **knobs)  # fmt: skip
    same = load_file(str(p0 / LORA_FILE))
    assert all(torch.equal(same[k], loras["sft"][k]) for k in loras["sft"])
    with pytest.raises(UserError, match="already holds a run"):  # and the folder still names its arms
        run(tiny_model_dir, tiny_data_dir, out, objective="soar,sft", **knobs)
    assert config.saved_objective(out) == "sft,scheduled,soar"


def test_reflexflow_arm_trains_its_own_lora_and_off_is_the_scheduled_arm(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """scheduled,reflexflow: the same drifted states (same draws), a different LoRA; with alpha = beta1 = 0
    a reflexflow run gives the scheduled arm's LoRA bit for bit, and its metrics carry the anti-drift term."""
    knobs = {"steps": 2, "data.cache_dir": tmp_path / "cache", "num_sampling_steps": 4}
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "arms", objective="scheduled,reflexflow", **knobs)
    record = json.loads((out / "reflexflow" / train.RUN_RECORD).read_text())
    assert "reflexflow fc_alpha=1 adr_weight=10 fc_weight=1" in record["rollout"]
    loras = {arm: load_file(str(out / arm / LORA_FILE)) for arm in ("scheduled", "reflexflow")}
    assert any(not torch.equal(loras["scheduled"][k], loras["reflexflow"][k]) for k in loras["scheduled"])
    metrics = [json.loads(line) for line in (out / "reflexflow" / train.METRICS).read_text().splitlines()]
    assert all(m["aux_per_sample"] == 1 and m["loss_aux"] > 0 for m in metrics)
    off = {"reflexflow.fc_alpha": 0.0, "reflexflow.adr_weight": 0.0}
    same = load_file(str(run(tiny_model_dir, tiny_data_dir, tmp_path / "off", objective="reflexflow",
                             **off, **knobs) / LORA_FILE))  # fmt: skip
    assert all(torch.equal(same[k], loras["scheduled"][k]) for k in loras["scheduled"])


def test_second_run_reuses_the_cache_without_loading_encoders(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    shared = tmp_path / "cache"
    run(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path / "one",
        steps=1,
        objective="sft",
        **{"data.cache_dir": shared},
    )
    from soar_lite.families.sd3 import SD3Family

    real_load = SD3Family.load

    def no_encoders(*args, **kwargs):
        assert kwargs.get("text_encoders") is False, "training loaded text encoders despite a complete cache"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(SD3Family, "load", no_encoders)
    run(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path / "two",
        steps=1,
        objective="sft",
        **{"data.cache_dir": shared},
    )
    assert len(list(shared.iterdir())) == 1


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / LORA_FILE))


def test_gradient_checkpointing_gives_the_same_lora(tiny_model_dir, tiny_data_dir, tmp_path):
    knobs = {"steps": 2, "data.cache_dir": tmp_path / "cache"}
    plain = _lora(run(tiny_model_dir, tiny_data_dir, tmp_path / "a", **knobs))
    ckpt = _lora(run(tiny_model_dir, tiny_data_dir, tmp_path / "b", gradient_checkpointing=True, **knobs))
    for key in plain:
        torch.testing.assert_close(plain[key], ckpt[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        {"optimizer": "adamw8bit"},
        {"optimizer": "adafactor"},
        {"mixed_precision": "bf16"},
        {"gradient_accumulation": 2, "lr_scheduler": "linear"},
    ],
)
def test_optimizer_and_precision_variants_train(tiny_model_dir, tiny_data_dir, tmp_path, extra):
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "v", steps=2, **extra)
    weights = _lora(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k), "the adapter never moved"


def test_a_run_folder_is_a_preset_that_repeats_the_run_exactly(tiny_model_dir, tiny_data_dir, tmp_path):
    first = run(tiny_model_dir, tiny_data_dir, tmp_path / "first", steps=2, seed=7, lr=3e-3)
    assert (first / train.RUN_CONFIG).read_text().startswith("# The settings of the run in first/")
    cfg = config.load_config(str(first))
    original = json.loads((first / train.RUN_RECORD).read_text())["config"]
    assert json.loads(json.dumps(config.config_to_dict(cfg))) == original
    again = train.train(cfg, tmp_path / "again", progress=False)
    a, b = load_file(str(first / LORA_FILE)), load_file(str(again / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    varied = config.load_config(str(first), ["steps=5"])
    assert varied.steps == 5 and varied.seed == 7


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a soar-lite run folder"):
        config.load_config(str(tmp_path))


def test_ema_lora_is_written_loads_in_diffusers_and_resumes_exactly(tiny_model_dir, tiny_data_dir, tmp_path):
    from soar_lite.ema import EMA_FILE

    knobs = {"steps": 4, "ema_decay": 0.9, "checkpoint_every": 2, "data.cache_dir": tmp_path / "cache"}
    straight = run(tiny_model_dir, tiny_data_dir, tmp_path / "a", **knobs)
    raw, ema = load_file(str(straight / LORA_FILE)), load_file(str(straight / EMA_FILE))
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # an average, not the last step

    with ctrl_c_at(2), pytest.raises(UserError, match="interrupted"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "b", **knobs)
    resumed = run(tiny_model_dir, tiny_data_dir, tmp_path / "b", resume="latest", **knobs)
    again = load_file(str(resumed / EMA_FILE))
    assert all(torch.equal(ema[k], again[k]) for k in ema)

    pipe = _pipe(tiny_model_dir)
    before = _sample(pipe)
    pipe.load_lora_weights(str(straight), weight_name=EMA_FILE)
    assert not torch.allclose(_sample(pipe), before)
    assert not (tmp_path / "plain").exists()
    plain = run(
        tiny_model_dir, tiny_data_dir, tmp_path / "plain", steps=1, **{"data.cache_dir": tmp_path / "cache"}
    )
    assert not (plain / EMA_FILE).exists()


@pytest.mark.parametrize(("every", "steps_logged"), [(1, [1, 2]), (0, [2])])
def test_validation_samples_reach_tensorboard(tiny_model_dir, tiny_data_dir, tmp_path, every, steps_logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    knobs = {"steps": 2, "validation.num_prompts": 1, "validation.steps": 2, "validation.every": every}
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "run", **knobs)
    logged = []
    for events in sorted((out / "logs").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            assert tag.startswith("samples/00 ")
            logged += [(e.step, e.width, e.height) for e in acc.Images(tag)]
    assert [step for step, _, _ in logged] == steps_logged
    assert all((w, h) == (32, 32) for _, w, h in logged)


def test_training_from_the_disk_cache_gives_the_same_lora_as_from_ram(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    knobs = {"steps": 3, "data.cache_dir": tmp_path / "cache", "data.caption_dropout": 0.2}
    ram = run(tiny_model_dir, tiny_data_dir, tmp_path / "ram", **knobs, **{"data.cache_in_ram": "always"})
    disk = run(tiny_model_dir, tiny_data_dir, tmp_path / "disk", **knobs, **{"data.cache_in_ram": "never"})
    a, b = load_file(str(ram / LORA_FILE)), load_file(str(disk / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _interrupt(monkeypatch, objective: str, at: int) -> None:
    real = train.train_step

    def step(run_, cfg, state):
        if cfg.objective == objective and state.step == at:
            raise KeyboardInterrupt
        return real(run_, cfg, state)

    monkeypatch.setattr(train, "train_step", step)


@pytest.mark.parametrize("stopped_in", ["sft", "soar"])
def test_both_arms_resume_whichever_arm_was_stopped(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, stopped_in
):
    knobs = {"steps": 3, "objective": "both", "data.cache_dir": tmp_path / "cache"}
    straight = run(tiny_model_dir, tiny_data_dir, tmp_path / "a", **knobs)
    _interrupt(monkeypatch, stopped_in, at=2)
    with pytest.raises(UserError, match="interrupted at step 2"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "b", **knobs)
    monkeypatch.undo()
    resumed = run(tiny_model_dir, tiny_data_dir, tmp_path / "b", resume="latest", **knobs)
    for arm in ("sft", "soar"):
        a, b = load_file(str(straight / arm / LORA_FILE)), load_file(str(resumed / arm / LORA_FILE))
        assert all(torch.equal(a[k], b[k]) for k in a), arm


def test_a_finished_run_resumes_to_nothing_or_extends_to_more_steps(
    tiny_model_dir, tiny_data_dir, tmp_path, capsys
):
    knobs = {"checkpoint_every": 2, "data.cache_dir": tmp_path / "cache"}
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "r", steps=3, **knobs)
    before = (out / LORA_FILE).stat().st_mtime_ns
    train.train(
        config.load_config(str(out)), out, resume="latest", progress=True
    )  # the same settings: nothing to do
    assert "already complete (3 steps), nothing to resume" in capsys.readouterr().out
    assert (out / LORA_FILE).stat().st_mtime_ns == before
    extended = run(tiny_model_dir, tiny_data_dir, tmp_path / "r", resume="latest", steps=5, **knobs)
    straight = run(tiny_model_dir, tiny_data_dir, tmp_path / "s", steps=5, **knobs)
    a, b = load_file(str(extended / LORA_FILE)), load_file(str(straight / LORA_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((extended / train.RUN_RECORD).read_text())["steps_done"] == 5


def test_resuming_after_a_hard_kill_logs_each_step_once(tiny_model_dir, tiny_data_dir, tmp_path):
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "r", steps=4, checkpoint_every=2)
    metrics = out / train.METRICS
    rows = metrics.read_text().splitlines()
    # as if killed hard after step 3 (no Ctrl-C checkpoint): the record says running, step 4 never
    # finished, and the kill cut the last metrics line short
    metrics.write_text("\n".join(rows[:3]) + '\n{"step": 4, "lo')
    shutil.rmtree(out / "checkpoints" / "step-000004")
    record = json.loads((out / train.RUN_RECORD).read_text())
    (out / train.RUN_RECORD).write_text(json.dumps({**record, "status": "running", "steps_done": 3}))
    (out / LORA_FILE).unlink()
    run(tiny_model_dir, tiny_data_dir, out, resume="latest", steps=4, checkpoint_every=2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_dora_trains_loads_in_diffusers_exactly_and_refuses_lossy_exports(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    from soar_lite import export

    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "dora", steps=2, use_dora=True, lr=1e-2)
    weights = load_file(str(out / LORA_FILE))
    module = "transformer_blocks.0.attn.to_q"
    magnitude = weights[f"transformer.{module}.lora_magnitude_vector"]
    a, b = weights[f"transformer.{module}.lora_A.weight"], weights[f"transformer.{module}.lora_B.weight"]
    pipe = _pipe(tiny_model_dir)
    w = pipe.transformer.state_dict()[f"{module}.weight"].clone()
    pipe.load_lora_weights(str(out / LORA_FILE))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights
    merged = w + b @ a  # scale folded into B
    expected = magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True)  # DoRA: per output row
    torch.testing.assert_close(
        pipe.transformer.state_dict()[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(expected, w, atol=1e-4)  # it trained
    for fmt in ("kohya", "comfyui"):
        with pytest.raises(UserError, match="DoRA LoRA: kohya tools and ComfyUI normalise"):
            export.export_lora(out, fmt, tmp_path / f"x-{fmt}.safetensors")
    with pytest.raises(UserError, match="strength is not a weight scale"):
        export.export_lora(out, "diffusers", tmp_path / "x.safetensors", strength=0.5)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_train_checkpoint_resume_and_ema_bit_for_bit(
    kind, tiny_model_dir, tiny_data_dir, tmp_path
):
    from soar_lite.ema import EMA_FILE

    knobs = {"steps": 4, "lora.type": kind, "lr": 1e-2, "ema_decay": 0.9, "checkpoint_every": 2,
             "data.cache_dir": tmp_path / "cache"}  # fmt: skip
    straight = run(tiny_model_dir, tiny_data_dir, tmp_path / "a", **knobs)
    with ctrl_c_at(2), pytest.raises(UserError, match="interrupted at step 2"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "b", **knobs)
    resumed = run(tiny_model_dir, tiny_data_dir, tmp_path / "b", resume="latest", **knobs)
    for name in (LORA_FILE, EMA_FILE):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    weights = load_file(str(straight / LORA_FILE))
    factor = {"lokr": ".lokr_w1", "loha": ".hada_w1_a"}[kind]
    moved = [k for k in weights if k.endswith(factor)]
    assert moved and any(weights[k].abs().max() > 0 for k in moved), "the adapter never moved"
    assert all(float(v) == 4.0 for k, v in weights.items() if k.endswith(".alpha"))  # alpha = rank
    assert not any("lora_A" in k for k in weights)


def test_prodigy_resumes_bit_for_bit_with_its_step_size_estimate(tiny_model_dir, tiny_data_dir, tmp_path):
    knobs = {"steps": 4, "optimizer": "prodigy", "lr": 1.0, "checkpoint_every": 2, "lr_scheduler": "cosine",
             "warmup_steps": 1, "data.cache_dir": tmp_path / "cache"}  # fmt: skip
    straight = load_file(str(run(tiny_model_dir, tiny_data_dir, tmp_path / "a", **knobs) / LORA_FILE))
    with ctrl_c_at(2), pytest.raises(UserError, match="interrupted at step 2"):
        run(tiny_model_dir, tiny_data_dir, tmp_path / "b", **knobs)
    (group,) = torch.load(tmp_path / "a" / "checkpoints" / "step-000004" / "optimizer.pt")["param_groups"]
    # Prodigy's own state (step count past the lr-0 warm-up step, its step-size estimate's running sums)
    assert group["k"] == 3 and group["d_numerator"] > 0 and group["d0"] == 1e-6
    assert group["use_bias_correction"] and group["safeguard_warmup"] and group["decouple"]
    resumed = run(tiny_model_dir, tiny_data_dir, tmp_path / "b", resume="latest", **knobs)
    again = load_file(str(resumed / LORA_FILE))
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    assert any(w.abs().max() > 0 for k, w in straight.items() if "lora_B" in k)


def test_loraplus_run_keeps_b_at_ratio_x_lr_through_the_schedule(tiny_model_dir, tiny_data_dir, tmp_path):
    out = run(tiny_model_dir, tiny_data_dir, tmp_path / "p", steps=2, loraplus_ratio=4, checkpoint_every=2,
              lr_scheduler="linear")  # fmt: skip
    groups = torch.load(out / "checkpoints" / "step-000002" / "optimizer.pt")["param_groups"]
    assert [g["initial_lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(4e-3)]
    assert groups[1]["lr"] == pytest.approx(4 * groups[0]["lr"])


def test_loraplus_groups_put_only_b_matrices_at_ratio_x_lr():
    from soar_lite.lora import add_lora
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    cfg = config.build_config({}, ["loraplus_ratio=16", "lr=2e-4", "use_dora=true"])
    model = tiny_sd3_transformer(0)
    model.requires_grad_(False)
    params = add_lora(model, cfg.lora)
    groups = train.param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[1]["lr"] == pytest.approx(3.2e-3) and "lr" not in groups[0]
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert not any(".lora_B." in names[id(p)] for p in groups[0]["params"])
    assert any("magnitude" in names[id(p)] for p in groups[0]["params"])  # DoRA's magnitude: base lr
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(params)
    opt = train.build_optimizer(groups, cfg)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(2e-4), pytest.approx(3.2e-3)]


def test_prodigy_at_an_adamw_learning_rate_or_with_loraplus_is_refused():
    with pytest.raises(UserError, match=r"set lr=1\.0"):
        config.build_config({}, ["optimizer=prodigy"])
    with pytest.raises(UserError, match="Prodigy takes one for all parameters"):
        config.build_config({}, ["optimizer=prodigy", "lr=1", "loraplus_ratio=16"])
