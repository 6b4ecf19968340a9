"""Runs that nothing corrupts: one run per output folder, SIGKILLs mid-write, a full disk, bad
numbers and sizes refused before a step, ``done`` only with the LoRA and the final samples on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soar_lite import config, run_folder, train
from soar_lite.cli import main
from soar_lite.errors import UserError
from soar_lite.run_folder import LORA_FILE, RUN_RECORD
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- checked before anything loads


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=nan", "optim.lr='nan' is not a valid finite number"),
        ("lr=inf", "is not a valid finite number"),
        ("optim.beta1=5", "optim.beta1=5.0 must be in [0, 1)"),
        ("optim.beta2=1", "optim.beta2=1.0 must be in [0, 1)"),
        ("optim.eps=0", "optim.eps=0.0 must be > 0"),
        ("guidance_scale=-1", "validation.guidance_scale=-1.0 must be >= 0"),
        ("seed=-3", "seed=-3 must be in [0, 4294967296)"),
    ],
)
def test_bad_numbers_are_one_line_before_any_model_loads(override, message, capsys, tmp_path):
    code = main(
        ["train", "--model", str(tmp_path / "never-loaded"), "--output", str(tmp_path / "r"), override]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err
    assert not (tmp_path / "r").exists()


def test_nan_in_a_constructed_config_is_refused_too():
    with pytest.raises(UserError, match=r"optim.lr=nan must be a finite number > 0"):
        config.OptimConfig(lr=float("nan"))
    with pytest.raises(UserError, match=r"soar.logit_mean=inf must be a finite number"):
        config.TrainConfig(soar=config.SoarConfig(logit_mean=float("inf")))


@pytest.mark.parametrize("data", ["/", "/etc", "/proc"])
def test_a_system_folder_as_data_is_one_line(data, capsys, tmp_path):
    argv = ["train", "--data", data, "--model", str(tmp_path / "m"), "--output", str(tmp_path / "r")]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "is a system folder, not a dataset" in err


def test_an_unreadable_data_folder_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        assert main(["train", "--data", str(folder), "--output", str(tmp_path / "r")]) == 2
    finally:
        folder.chmod(0o755)
    assert "cannot read the data" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end on the tiny model


def _cfg(tiny_model_dir: Path, tiny_data_dir: Path, **extra: object) -> config.TrainConfig:
    values = {"model.path": tiny_model_dir, "data.path": tiny_data_dir, "objective": "sft", **extra}
    return config.load_config("cpu-tiny", tiny_overrides(**values))


def _train_argv(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    knobs = tiny_overrides(**{"objective": "sft"})
    return [sys.executable, "-m", "soar_lite.cli", "train", "--model", str(model), "--data", str(data),
            "--output", str(output), "--quiet", *knobs, *extra]  # fmt: skip


def _wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_refuses_and_a_killed_runs_lock_is_taken_over(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "r"
    argv = _train_argv(tiny_model_dir, tiny_data_dir, out, "steps=100000", "checkpoint_every=2")
    proc = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: run_folder.checkpoints(out / "checkpoints") or proc.poll() is not None, 180)
        assert proc.poll() is None, proc.stderr.read().decode()
        for resume in (None, "latest"):
            with pytest.raises(UserError, match=rf"in use by another run \(pid {proc.pid} on "):
                train.train(_cfg(tiny_model_dir, tiny_data_dir), out, resume=resume, progress=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert run_folder.read_record(out)["status"] == "running"  # killed: it could not say otherwise
    # how far the killed run got depends on the machine's load: continue 4 steps past its last checkpoint
    last = int(run_folder.STEP_DIR.match(run_folder.checkpoints(out / "checkpoints")[-1].name).group(1))
    target = last + 4
    train.train(_cfg(tiny_model_dir, tiny_data_dir, steps=target, checkpoint_every=2), out, resume="latest")
    record = run_folder.read_record(out)
    assert record["status"] == "done" and (out / LORA_FILE).is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == target and steps == sorted(set(steps))  # one writer at a time: no step twice


_KILL_IN_FIRST_CHECKPOINT = """
import sys, time, torch
real = torch.save
def slow_save(obj, path, *a, **k):
    real(obj, path, *a, **k)
    print("writing", path, flush=True)
    time.sleep(600)
torch.save = slow_save
from soar_lite.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_inside_the_first_checkpoint_write_neither_blocks_a_rerun_nor_a_resume(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "r"
    argv = _train_argv(tiny_model_dir, tiny_data_dir, out, "checkpoint_every=2")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_IN_FIRST_CHECKPOINT, *argv[3:]],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("writing") and ".tmp-step-000002" in line, line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list((out / "checkpoints").glob(".tmp-step-*")) and not run_folder.checkpoints(out / "checkpoints")
    # --resume latest: nothing complete to resume, so it starts from step 0 (and clears the leftovers)
    train.train(_cfg(tiny_model_dir, tiny_data_dir, checkpoint_every=2), out, resume="latest", progress=False)
    assert run_folder.read_record(out)["status"] == "done"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # the same kill again, then a plain rerun (no --overwrite): a run with nothing complete starts again
    (out / LORA_FILE).unlink()
    for step in run_folder.checkpoints(out / "checkpoints"):
        for f in step.iterdir():
            f.unlink()
        step.rmdir()
    record = run_folder.read_record(out)
    run_folder.write_record(out, {**record, "status": "running", "steps_done": 1})
    train.train(_cfg(tiny_model_dir, tiny_data_dir), out, progress=False)
    assert run_folder.read_record(out)["status"] == "done"


@pytest.mark.slow
def test_a_full_disk_is_one_line_marks_the_record_failed_and_keeps_earlier_checkpoints(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    from safetensors import SafetensorError

    from soar_lite import checkpoint, lora

    real = lora.atomic_save

    def fill_up_at_step_4(tensors, path, metadata=None):
        if "step-000004" in str(path):
            Path(path).with_name(Path(path).name + ".tmp-1").write_bytes(b"half")  # a partial write
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, .. })")
        return real(tensors, path, metadata)

    monkeypatch.setattr(lora, "atomic_save", fill_up_at_step_4)
    out = tmp_path / "r"
    with pytest.raises(UserError) as info:
        train.train(_cfg(tiny_model_dir, tiny_data_dir, steps=6, checkpoint_every=2), out, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write {out / 'checkpoints' / 'step-000004'}: no space left (" in message
    assert "MiB needed" in message and "earlier checkpoints are intact" in message
    record = run_folder.read_record(out)
    assert record["status"] == "failed" and "no space left" in record["reason"]
    assert [p.name for p in run_folder.checkpoints(out / "checkpoints")] == ["step-000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the failed write cleaned up after itself
    assert (out / "checkpoints" / "step-000002" / "adapter.safetensors").stat().st_size > 0
    monkeypatch.setattr(lora, "atomic_save", real)
    assert checkpoint.resolve(out / "checkpoints", "latest").name == "step-000002"
    train.train(_cfg(tiny_model_dir, tiny_data_dir, steps=6, checkpoint_every=2), out, resume="latest")
    assert run_folder.read_record(out)["status"] == "done"


@pytest.mark.slow
def test_a_resolution_off_the_family_multiple_fails_before_the_first_step(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    out = tmp_path / "r"
    # the tiny model: VAE factor 2 x patch size 2 = sides in multiples of 4 (SD3 itself: 8 x 2 = 16)
    with pytest.raises(UserError, match=r"data.resolution=33 is not a multiple of 4, .*: use 32 or 36$"):
        train.train(_cfg(tiny_model_dir, tiny_data_dir, resolution=33), out, progress=False)
    assert not (out / "metrics.jsonl").exists() and not (out / LORA_FILE).exists()


@pytest.mark.slow
def test_done_is_written_only_after_the_lora_and_the_final_samples(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    def validation_crashes(*args, **kwargs):
        raise RuntimeError("sampling crashed")

    monkeypatch.setattr(train, "validate", validation_crashes)
    out = tmp_path / "r"
    cfg = _cfg(tiny_model_dir, tiny_data_dir, **{"validation.num_prompts": 1, "validation.steps": 2})
    with pytest.raises(RuntimeError, match="sampling crashed"):
        train.train(cfg, out, progress=False)
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["status"] == "failed" and record["reason"] == "sampling crashed"
    assert not train.finished(out, cfg)
