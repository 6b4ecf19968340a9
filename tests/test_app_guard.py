"""What the app may touch, without a browser: folder roots on real paths, path settings, the login
throttle, caption writes only beside images, temp uploads deleted, one set of upload limits,
truncated images flagged, and the run queue (ten starts, one trainer)."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from soar_lite import app_runs, config, uploads
from soar_lite.app_guard import LoginThrottle, Roots
from soar_lite.app_runs import APP_RECORD, TrainRequest
from soar_lite.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def roots(tmp_path) -> Roots:
    (tmp_path / "runs" / "datasets" / "set").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "elsewhere").mkdir()
    return Roots.of(tmp_path / "runs", [tmp_path / "shared"])


def test_only_the_runs_folder_and_allowed_folders_pass_on_their_real_paths(roots, tmp_path):
    assert roots.confine(tmp_path / "runs" / "datasets" / "set") == (tmp_path / "runs/datasets/set").resolve()
    assert roots.confine(str(tmp_path / "shared")) == (tmp_path / "shared").resolve()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")  # a symlink out of the runs dir
    for hostile in [
        tmp_path / "elsewhere",
        tmp_path / "runs" / ".." / "elsewhere",
        tmp_path / "runs" / "link",
        tmp_path / "shared-evil",  # a sibling whose name starts like an allowed root
        "/etc",
        "/",
    ]:
        with pytest.raises(UserError, match="outside the folders this app may use"):
            roots.confine(hostile)
    with pytest.raises(UserError, match="the file-system root would allow everything"):
        Roots.of(tmp_path / "runs", ["/"])
    assert Roots.of(tmp_path / "runs").describe().endswith("start the app with --allow-folder DIR to add one")


@pytest.mark.parametrize(
    "override",
    ["data.cache_dir={out}", "cache_dir={out}", "data.path={out}", "image_dir={out}", "model.path={out}"],
)
def test_path_settings_outside_the_roots_are_refused(roots, tmp_path, override):
    cfg = config.load_config("cpu-tiny", [override.format(out=tmp_path / "elsewhere")])
    with pytest.raises(UserError, match=r"outside the folders this app may use"):
        roots.check_settings(cfg)


def test_path_settings_inside_the_roots_builtin_and_hub_ids_pass(roots, tmp_path):
    inside = tmp_path / "shared"
    cfg = config.load_config("cpu-tiny", [f"cache_dir={inside}/cache", f"data.path={inside}"])
    roots.check_settings(cfg)
    roots.check_settings(
        config.load_config("cpu-tiny", ["model.path=stabilityai/stable-diffusion-3.5-medium"])
    )
    roots.check_settings(config.load_config("cpu-tiny"))  # builtin model and data


def test_the_app_refuses_a_run_whose_cache_dir_is_outside_before_any_folder(roots, tmp_path):
    request = TrainRequest(extra=[f"cache_dir={tmp_path / 'elsewhere'}"])
    with pytest.raises(UserError, match=r"data\.cache_dir="):
        app_runs.start_training(roots.runs_dir, request, check=roots.check_settings)
    assert not [p for p in roots.runs_dir.iterdir() if p.name != "datasets"]


def test_login_throttle_counts_failures_per_client_within_a_window():
    now = [0.0]
    throttle = LoginThrottle(max_failures=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("1.2.3.4") == 0
        throttle.failed("1.2.3.4")
    assert throttle.retry_after("1.2.3.4") == pytest.approx(60)
    assert throttle.retry_after("5.6.7.8") == 0  # another client is not punished
    now[0] = 30.0
    assert throttle.retry_after("1.2.3.4") == pytest.approx(30)
    now[0] = 60.5
    assert throttle.retry_after("1.2.3.4") == 0  # the window moved on


def test_captions_are_written_only_beside_images_of_the_dataset(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "important.txt").write_text("keep me")
    (folder / "notes.yaml").write_text("x: 1")
    for name in ("important.txt", "notes.yaml", "../set/notes.yaml"):
        with pytest.raises(UserError, match="is not an image of this dataset"):
            uploads.write_captions(folder, {name: "overwritten"})
    assert (folder / "important.txt").read_text() == "keep me" and not (folder / "notes.txt").exists()
    assert uploads.write_captions(folder, {"a.png": "a black square"}) == 1
    assert (folder / "a.txt").read_text() == "a black square\n"


def test_discarding_uploads_deletes_only_inside_the_upload_folder(tmp_path):
    temp = tmp_path / "gradio"
    (temp / "abc123").mkdir(parents=True)
    upload = temp / "abc123" / "set.zip"
    upload.write_bytes(b"zip")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    assert uploads.discard_uploads([str(upload), str(victim), str(temp / ".." / "victim.txt")], temp) == 1
    assert not upload.exists() and not (temp / "abc123").exists() and victim.read_text() == "mine"


def test_one_set_of_limits_in_code_readme_and_gradio():
    from app import server

    limits = uploads.UploadLimits()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"Uploads are capped: {limits.describe()}." in " ".join(readme.split())
    opts = server.resolve_options(runs_dir=REPO / "runs-never-created")
    assert server.launch_kwargs(opts)["max_file_size"] == limits.max_upload_bytes


def test_a_zip_of_many_members_each_under_the_member_rule_is_refused_as_a_whole(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(200):  # 200 x (1 MiB - 1): each under the per-member ratio rule's 1 MiB
            z.writestr(f"{i:04d}.txt", b"\0" * (uploads.MiB - 1))
    assert path.stat().st_size < 2 * uploads.MiB
    with pytest.raises(UserError, match=r"inflates \d+x as a whole \(limit 100x\): a zip bomb"):
        uploads.safe_extract_zip(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_dataset_page_flags_a_truncated_image_as_the_cache_stage_would(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("good", "cut"):
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, "PNG")
        data = buffer.getvalue()
        (folder / f"{name}.png").write_bytes(data if name == "good" else data[: len(data) // 2])
        (folder / f"{name}.txt").write_text(f"a {name} image")
    report = uploads.dataset_report(folder)
    assert [item.name for item in report.items] == ["good.png"]
    assert any("cut.png" in names for names in report.skipped.values())
    assert "1 more skipped when decoded" in report.summary


# ---------------------------------------------------------------- the queue


@pytest.fixture
def sleepers(monkeypatch):
    """Runs whose "trainer" is a sleeping process naming its folder (as the real command does)."""
    procs: list[subprocess.Popen] = []
    monkeypatch.setattr(
        app_runs,
        "train_argv",
        lambda request, folder: [sys.executable, "-c", "import time; time.sleep(60)", str(folder)],
    )
    real_launch = app_runs._launch

    def launch(folder, argv):
        real_launch(folder, argv)
        procs.append(app_runs._PROCS[folder])

    monkeypatch.setattr(app_runs, "_launch", launch)
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_ten_starts_at_once_train_one_and_queue_nine_in_order(tmp_path, sleepers):
    runs = tmp_path / "runs"
    folders: list[Path] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            folders.append(app_runs.start_training(runs, TrainRequest(name=f"r{i}", steps=2), max_runs=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(folders) == 10
    assert len(app_runs.live_runs(runs)) == 1 and len(sleepers) == 1
    waiting = app_runs.queued_runs(runs)
    assert len(waiting) == 9 and all(app_runs.run_state(f) == "queued" for f in waiting)
    first = waiting[0]
    assert app_runs.queue_position(first) == 1

    app_runs._PROCS.clear()  # as after an app restart: the queue is read back from the run folders
    assert app_runs.queued_runs(runs) == waiting
    sleepers[0].kill()
    sleepers[0].wait()
    assert app_runs.launch_queued(runs, 1) == [first]  # the slot freed: the oldest request starts
    assert app_runs.run_state(first) == "running" and len(app_runs.queued_runs(runs)) == 8

    last = waiting[-1]
    assert "removed from the queue" in app_runs.stop_training(last)
    assert app_runs.run_state(last) == "stopped" and last not in app_runs.queued_runs(runs)
    assert '"queued": null' in (last / APP_RECORD).read_text()
