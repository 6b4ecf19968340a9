"""The app's run logic without a browser: argument lists, validation first, progress and state from
the files a run writes, a runs list that survives a restart, stop, and a crash that stays contained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from soar_lite import app_runs, config
from soar_lite.app_runs import APP_RECORD, TrainRequest
from soar_lite.errors import UserError
from soar_lite.train import METRICS, RUN_RECORD


def test_record_names_match_the_trainer():
    from soar_lite import lora

    assert (app_runs.RUN_RECORD, app_runs.METRICS, app_runs.LORA_FILE) == (
        RUN_RECORD,
        METRICS,
        lora.LORA_FILE,
    )


def test_a_request_is_an_argument_list_and_user_strings_stay_single_arguments(tmp_path):
    nasty = str(tmp_path / "my model; rm -rf ~ $(reboot)")
    request = TrainRequest(model=nasty, objective="both", steps=3.0, rank=4, lr=5e-5, trajectory_length=2)
    args = request.cli_args(tmp_path / "run")
    assert args[:2] == ["train", "--preset"] and nasty in args and "--data" not in args
    assert {"objective=both", "steps=3", "rank=4", "lr=5e-05", "trajectory_length=2"} <= set(args)
    command = app_runs.display_command([sys.executable, "-m", "soar_lite.cli", *args])
    assert command.startswith("soar-lite train ") and f"'{nasty}'" in command
    assert request.validate().objective == "both"
    assert app_runs.parse_extra("batch_size=4 'validation.prompts=a red circle, a blue square'") == [
        "batch_size=4",
        "validation.prompts=a red circle, a blue square",
    ]


@pytest.mark.parametrize(
    ("request_kwargs", "match"),
    [
        ({"objective": "best"}, "objective='best' is not valid"),
        ({"extra": ["--overwrite"]}, "not key=value"),
        ({"extra": ["stepz=3"]}, "unknown setting 'stepz'"),
        ({"model": "--overwrite"}, "not a valid model"),
        ({"preset": "99gb"}, "unknown preset"),
        ({"name": "../escape"}, "run name"),
        ({"name": "datasets"}, "run name"),
    ],
)
def test_bad_settings_fail_before_any_folder_or_process(tmp_path, request_kwargs, match):
    with pytest.raises(UserError, match=match):
        app_runs.start_training(tmp_path / "runs", TrainRequest(**request_kwargs))
    assert not any((tmp_path / "runs").glob("*/*"))


def test_an_existing_run_is_never_reused(tmp_path):
    app_runs.new_run_folder(tmp_path, "mine")
    with pytest.raises(UserError, match="exists already"):
        app_runs.new_run_folder(tmp_path, "mine")


# ---------------------------------------------------------------- a run made of files


def _arm(folder: Path, steps_done: int, status: str, objective: str) -> None:
    folder.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "loss": 1.0,
            "loss_main": 1.0 / s,
            "loss_aux": 2.0 / s,
            "step_time": 9.0 if s == 1 else 2.0,
        }
        for s in range(1, steps_done + 1)
    ]
    (folder / METRICS).write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo', encoding="utf-8"
    )
    record = {
        "status": status,
        "steps_done": steps_done,
        "steps": 4,
        "base_model": "/models/tiny",
        "objective": objective,
    }
    (folder / RUN_RECORD).write_text(json.dumps(record), encoding="utf-8")
    for step in (2, steps_done):
        sample = folder / "samples" / f"step-{step:06d}"
        sample.mkdir(parents=True, exist_ok=True)
        (sample / "00.png").write_bytes(b"png")
        (sample / "00.txt").write_text("a red circle", encoding="utf-8")
    if status == "done":
        save_file({"transformer.x.lora_A.weight": torch.ones(2, 2)}, str(folder / app_runs.LORA_FILE))


def fake_both_run(runs: Path, name: str, pid: int | None, created: float) -> Path:
    """An objective=both run as the app leaves it: SFT arm done, SOAR arm at step 2 of 4."""
    folder = runs / name
    folder.mkdir(parents=True)
    cfg = config.config_to_dict(config.load_config("cpu-tiny", ["objective=both", "steps=4"]))
    record = {"argv": [], "command": "soar-lite train ...", "config": cfg, "created": created, "pid": pid}
    (folder / APP_RECORD).write_text(json.dumps(record), encoding="utf-8")
    _arm(folder / "sft", 4, "done", "sft")
    _arm(folder / "soar", 2, "running", "soar")
    return folder


@pytest.fixture
def sleeper(tmp_path):
    """A live process whose command line names the run folder, as a training process's does."""
    folder = tmp_path / "runs" / "live"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(folder)])
    yield folder, proc
    proc.kill()
    proc.wait()


def test_progress_and_state_of_a_live_run_are_read_from_its_files(sleeper):
    folder, proc = sleeper
    fake_both_run(folder.parent, folder.name, proc.pid, time.time())
    app_runs._PROCS.clear()  # as after an app restart: only the pid in the record is known
    p = app_runs.read_progress(folder)
    assert (p.state, p.step, p.total, p.arm) == ("running", 6, 8, "soar")
    assert p.eta_s == pytest.approx(2.0 * 2)  # median step time without the warm-up step x 2 left
    series = [row["series"] for row in p.losses]
    assert series.count("sft main") == 4 and "sft aux" not in series
    assert series.count("soar main") == 2 and series.count("soar aux") == 2
    assert [caption for _, caption in p.samples] == ["sft step 4: a red circle", "soar step 2: a red circle"]
    assert "running" in p.summary() and "step 6/8" in p.summary() and "ETA 4s" in p.summary()
    proc.kill()
    proc.wait()
    assert app_runs.run_state(folder) == "failed"  # died without finishing and nobody asked it to stop


def test_a_reused_pid_does_not_pass_for_a_run(tmp_path):
    folder = fake_both_run(tmp_path, "old", os.getpid(), time.time())  # alive, but not this run
    assert not app_runs.is_alive(folder)


def test_runs_list_reads_the_disk_so_a_restart_loses_nothing(tmp_path):
    runs = tmp_path / "runs"
    fake_both_run(runs, "older", None, 1000.0)
    newer = fake_both_run(runs, "newer", None, 2000.0)
    _arm(newer / "soar-extra", 4, "done", "soar")
    cli_run = runs / "from-cli"
    _arm(cli_run, 4, "done", "soar")
    half_cli = runs / "half-cli"
    _arm(half_cli, 2, "running", "soar")
    (runs / "datasets" / "upload-1").mkdir(parents=True)
    (runs / "notes").mkdir()
    app_runs._PROCS.clear()
    listed = {r.name: r for r in app_runs.list_runs(runs)}
    assert set(listed) == {"older", "newer", "from-cli", "half-cli"}
    assert [r.name for r in app_runs.list_runs(runs)][-2:] == ["newer", "older"]  # by created, newest first
    assert listed["from-cli"].state == "done" and listed["half-cli"].state == "incomplete"
    assert listed["older"].objective == "both" and listed["older"].steps == 4
    details = app_runs.run_details(app_runs.resolve_run(runs, "older"))
    assert details["arms"]["sft"]["status"] == "done" and details["config"]["objective"] == "both"
    assert set(app_runs.lora_files(runs / "older")) == {"sft"}
    with pytest.raises(UserError):
        app_runs.resolve_run(runs, "../older")
    with pytest.raises(UserError, match="no run named"):
        app_runs.resolve_run(runs, "notes")


def test_export_names_files_after_run_and_arm(tmp_path):
    folder = fake_both_run(tmp_path, "r1", None, 0.0)
    files = app_runs.export_files(folder, kohya=False)
    assert [f.name for f in files] == ["r1-sft.safetensors"]
    assert files[0].read_bytes() == (folder / "sft" / app_runs.LORA_FILE).read_bytes()


def test_compare_needs_a_prompt_and_a_finished_arm(tmp_path):
    folder = tmp_path / "empty"
    _arm(folder, 1, "running", "soar")
    with pytest.raises(UserError, match="prompt"):
        app_runs.compare_run(folder, "  ", 0, 2, 4.5)
    with pytest.raises(UserError, match="no finished LoRA"):
        app_runs.compare_run(folder, "a red circle", 0, 2, 4.5)


def test_format_seconds():
    assert [app_runs.format_seconds(s) for s in (4.4, 75, 3725)] == ["4s", "1m 15s", "1h 02m"]


# ---------------------------------------------------------------- real training processes


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_crashing_run_fails_alone_and_says_why(tmp_path):
    request = TrainRequest(model=str(tmp_path / "no" / "such-model"), steps=2)
    folder = app_runs.start_training(tmp_path / "runs", request)
    assert app_runs.run_state(folder) in ("running", "failed")
    _wait(lambda: not app_runs.is_alive(folder), 120)
    assert app_runs.run_state(folder) == "failed"
    assert json.loads((folder / APP_RECORD).read_text())["exit_code"] == 2
    assert "soar-lite: error:" in app_runs.log_tail(folder)


@pytest.mark.slow
def test_stop_saves_a_checkpoint_and_resume_continues_from_it(tmp_path, tiny_model_dir, tiny_data_dir):
    extra = ["batch_size=4", "validation.num_prompts=0", "checkpoint_every=0"]
    request = TrainRequest(
        model=str(tiny_model_dir),
        data=str(tiny_data_dir),
        steps=500,
        rank=4,
        trajectory_length=2,
        extra=extra,
    )
    folder = app_runs.start_training(tmp_path / "runs", request)
    with pytest.raises(UserError, match="still running"):
        app_runs.resume_training(folder)
    _wait(lambda: bool(app_runs.read_metrics(folder / METRICS)), 180)
    assert app_runs.run_state(folder) == "running"
    assert "stopping" in app_runs.stop_training(folder)  # like Ctrl-C: a checkpoint first
    _wait(lambda: not app_runs.is_alive(folder), 120)
    assert app_runs.run_state(folder) == "stopped" and any((folder / "checkpoints").iterdir())
    assert "not running" in app_runs.stop_training(folder)
    stopped_at = int(re.search(r"interrupted at step (\d+)", app_runs.log_tail(folder)).group(1))

    assert "resuming" in app_runs.resume_training(folder)
    assert app_runs.run_state(folder) == "running"
    _wait(lambda: app_runs.read_metrics(folder / METRICS)[-1]["step"] > stopped_at + 1, 180)
    app_runs.stop_training(folder)
    _wait(lambda: not app_runs.is_alive(folder), 120)
    steps = [int(row["step"]) for row in app_runs.read_metrics(folder / METRICS)]
    assert steps == list(range(1, steps[-1] + 1))  # continued where it stopped: no step twice, none lost
    assert "--- resumed from the latest checkpoint" in (folder / "train.log").read_text()


def test_resume_refuses_what_it_cannot_continue(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    cli_run = runs / "from-the-cli"
    cli_run.mkdir(parents=True)
    (cli_run / RUN_RECORD).write_text(json.dumps({"status": "running"}))
    with pytest.raises(UserError, match="not started from the app: run `soar-lite train --preset"):
        app_runs.resume_training(cli_run)
    done = runs / "done"
    done.mkdir()
    (done / RUN_RECORD).write_text(json.dumps({"status": "done"}))
    with pytest.raises(UserError, match="complete: nothing to resume"):
        app_runs.resume_training(done)
    early = runs / "early"
    early.mkdir()
    (early / APP_RECORD).write_text(
        json.dumps({"argv": ["python", "-m", "soar_lite.cli", "train"], "pid": None})
    )
    launched = []
    monkeypatch.setattr(app_runs, "_launch", lambda folder, argv: launched.append(argv))
    # stopped before its first checkpoint: resuming starts it again (the trainer begins at step 0)
    assert "from step 0 (no complete checkpoint)" in app_runs.resume_training(early)
    assert launched == [["python", "-m", "soar_lite.cli", "train", "--resume", "latest"]]


def test_the_train_form_shows_the_planners_verdict():
    from app.main import preset_fit

    assert preset_fit("8gb", "stabilityai/stable-diffusion-3.5-medium").startswith(
        "Memory planner: ~2.2 GiB peak while training (fits a 8 GB card); caching: text encoders `sequential`"
    )
    large = preset_fit("16gb", "stabilityai/stable-diffusion-3.5-large")
    assert "(does NOT fit a 16 GB card); it fits with `quant=int8` in More settings" in large
    assert preset_fit("16gb", "someone/else").startswith("Memory planner: plan: no transformer config")


def test_a_cli_run_of_any_objective_list_lists_its_arms_from_its_config(tmp_path):
    """A CLI run has no app record and each arm's record names only its arm: the arms come from the
    run folder's config.yaml, in its order, also before a later arm has started."""
    folder = tmp_path / "runs" / "three"
    _arm(folder / "scheduled", 4, "done", "scheduled")
    _arm(folder / "sft", 1, "running", "sft")
    cfg = config.config_to_dict(config.load_config("cpu-tiny", ["objective=scheduled,sft,soar", "steps=4"]))
    (folder / "config.yaml").write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    for arm in ("scheduled", "sft"):  # the trainer's arm records hold the arm's own config
        record = json.loads((folder / arm / RUN_RECORD).read_text())
        record["config"] = {**cfg, "objective": arm}
        (folder / arm / RUN_RECORD).write_text(json.dumps(record), encoding="utf-8")
    assert app_runs.run_arms(folder) == [(a, folder / a) for a in ("scheduled", "sft", "soar")]
    p = app_runs.read_progress(folder)
    assert (p.step, p.total, p.arm) == (5, 12, "sft")
    series = {row["series"] for row in p.losses}
    assert {"scheduled main", "sft main"} <= series and not any("aux" in s for s in series)
    assert set(app_runs.lora_files(folder)) == {"scheduled"}


def test_an_old_both_run_without_a_folder_config_still_lists_sft_and_soar(tmp_path):
    folder = fake_both_run(tmp_path / "runs", "old", None, time.time())
    assert [label for label, _ in app_runs.run_arms(folder)] == ["sft", "soar"]
