"""The run folder's owner without training: one set of names, the lock, leftovers, write failures,
and the module graph (train, sample, export and the app read the folder without importing each other)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from soar_lite import run_folder
from soar_lite.errors import UserError
from soar_lite.run_folder import LOCK_FILE, RunLock

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_every_module_uses_the_owners_names():
    from soar_lite import app_runs, checkpoint, ema, lora, train

    assert (train.RUN_RECORD, train.METRICS, train.RUN_CONFIG) == (
        run_folder.RUN_RECORD,
        run_folder.METRICS,
        run_folder.RUN_CONFIG,
    )
    assert app_runs.RUN_RECORD is run_folder.RUN_RECORD and app_runs.LORA_FILE is run_folder.LORA_FILE
    assert ema.EMA_FILE is run_folder.EMA_FILE and checkpoint.checkpoints is run_folder.checkpoints
    assert lora.LORA_FILE == run_folder.LORA_FILE  # lora.py keeps its own copy (family seam, see README)


def test_the_owner_is_torch_free_and_sample_does_not_import_train():
    code = (
        "import sys; import soar_lite.run_folder, soar_lite.app_guard, soar_lite.base_model; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "import soar_lite.sample; assert 'soar_lite.train' not in sys.modules, 'sample imported train'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=REPO)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that takes the lock of ``folder`` and sleeps (prints 'locked' once it has it)."""
    code = (
        "import sys, time; from soar_lite.run_folder import RunLock; "
        f"RunLock({str(folder)!r}).acquire(); print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_with_its_holder_and_a_killed_holder_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        with pytest.raises(UserError, match=rf"in use by another run \(pid {proc.pid} on .*: wait for it"):
            RunLock(folder).acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # dies without releasing: the file still names it
        proc.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == proc.pid
    lock = RunLock(folder).acquire()
    try:
        assert lock.took_over["pid"] == proc.pid
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    with RunLock(folder) as again:  # a cleanly released lock is no takeover
        assert again.took_over is None


def test_stale_temporary_checkpoints_and_files_are_removed_and_complete_ones_kept(tmp_path):
    folder = tmp_path / "run"
    complete = folder / "checkpoints" / "step-000002"
    complete.mkdir(parents=True)
    (complete / "state.pt").write_bytes(b"x")
    half = folder / "checkpoints" / ".tmp-step-000004-999"
    half.mkdir()
    (half / "adapter.safetensors").write_bytes(b"half")
    (folder / "pytorch_lora_weights.safetensors.tmp-999").write_bytes(b"half")
    (folder / ".tmp-999-0123abcd-soar_lite_run.json").write_text("{")
    (folder / "notes.txt").write_text("mine")
    removed = run_folder.remove_stale_temp(folder)
    assert len(removed) == 3 and not half.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "notes.txt"]
    assert run_folder.checkpoints(folder / "checkpoints") == [complete]


def test_a_run_killed_before_its_first_checkpoint_has_no_results(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints" / ".tmp-step-000001-5").mkdir(parents=True)
    (folder / run_folder.RUN_RECORD).write_text(json.dumps({"status": "running"}))
    assert run_folder.holds_run(folder) and not run_folder.has_results(folder)
    (folder / "checkpoints" / "step-000001").mkdir()
    (folder / "checkpoints" / "step-000001" / "state.pt").write_bytes(b"x")
    assert run_folder.has_results(folder)


def test_clearing_a_folder_keeps_the_lock_we_hold(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder):
        (folder / "checkpoints").mkdir()
        (folder / run_folder.RUN_RECORD).write_text("{}")
        run_folder.clear(folder)
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left ("),
        (
            SafetensorError('IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
            "no space",
        ),
        (OSError(errno.EACCES, "Permission denied", "/x/y"), "cannot write /x/y: permission denied"),
    ],
)
def test_write_failures_are_one_line_with_path_and_space(tmp_path, exc, says):
    with pytest.raises(UserError) as info, run_folder.guard_write(tmp_path / "ckpt", needed=3 * 2**20):
        raise exc
    message = str(info.value)
    assert "\n" not in message and says in message and "earlier checkpoints are intact" in message
    if "space" in says:
        assert f"cannot write {tmp_path / 'ckpt'}" in message and "about 3.0 MiB needed" in message


def test_other_errors_pass_through_the_write_guard(tmp_path):
    with pytest.raises(ValueError), run_folder.guard_write(tmp_path):
        raise ValueError("a bug, not a full disk")


def test_mark_ended_changes_only_a_running_record(tmp_path):
    (tmp_path / run_folder.RUN_RECORD).write_text(json.dumps({"status": "running", "steps_done": 3}))
    assert run_folder.mark_ended(tmp_path, "failed", "disk full")
    record = run_folder.read_record(tmp_path)
    assert (record["status"], record["reason"], record["steps_done"]) == ("failed", "disk full", 3)
    assert not run_folder.mark_ended(tmp_path, "stopped", "again")  # a failed record stays failed


def test_every_promise_in_the_readme_names_a_test_that_exists():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What is guaranteed", 1)[1].split("\n## ", 1)[0]
    cited = re.findall(r"\b(test_[a-z0-9_]+)\b(?!\.py)", section)  # test names, not test files
    source = "".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("test_*.py"))
    assert len(cited) >= 15
    assert [name for name in cited if f"def {name}(" not in source] == []
