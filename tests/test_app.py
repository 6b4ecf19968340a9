"""The app in real Chromium (Playwright) against ``soar-lite app`` on localhost, as a user drives it.

One walk through every tab: upload a dataset zip, train both arms on a tiny untrained SD3, watch
the progress reach the end, compare base | SFT | SOAR, download a LoRA and open it. A screenshot of
each tab goes to ``test-artifacts/`` (gitignored; CI keeps it). Chromium and Playwright are
installed by ``.ci/run``: when they are missing these tests fail, they never skip.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRAIN_TIMEOUT_MS = 300_000  # two arms x 3 steps on a shared 2-core CPU: about a minute, often less

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``url`` answers (any HTTP status) or the server died; the server's log on failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not answer on {url} within {timeout:.0f}s")


@contextlib.contextmanager
def running_app(
    runs_dir: Path, *extra: str, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m soar_lite.cli app`` on a free port (the real entry point), stopped afterwards."""
    port = free_port()
    argv = [sys.executable, "-m", "soar_lite.cli", "app", "--port", str(port), "--runs-dir", str(runs_dir)]
    log = log or runs_dir.parent / f"app-{port}.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, *extra], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc)
        yield f"http://127.0.0.1:{port}/", proc
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shapes_zip(folder: Path, n: int = 8) -> Path:
    """A dataset zip as a user would make it: a top folder with images + captions, and macOS noise."""
    from soar_lite.toy.shapes import write_shapes_folder

    data = write_shapes_folder(folder / "shapes", n, seed=3)
    path = folder / "shapes.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for file in sorted(data.iterdir()):
            if file.suffix in (".png", ".txt"):
                z.write(file, f"shapes/{file.name}")
        z.writestr("__MACOSX/shapes/._0000.png", b"resource fork")
    return path


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[str, Path]]:
    """One app for the module (starting one costs ~20 s here): its URL and runs dir. The tiny model's
    folder is allowed at launch: the app refuses model paths outside its runs dir otherwise."""
    runs = tmp_path_factory.mktemp("app") / "runs"
    with running_app(runs, "--allow-folder", str(tiny_model_dir)) as (url, _):
        yield url, runs


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev,app]' (see .ci/run)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (see .ci/run)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"app-{name}.png"), full_page=True)


def goto(page: Any, url: str) -> None:
    """Open the app and wait until Gradio has built the page (its tabs are there)."""
    page.goto(url)
    page.get_by_role("tab", name="Runs", exact=True).wait_for(timeout=60_000)


def open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def fill(page: Any, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(value)


# ---------------------------------------------------------------- the walk, tab by tab


def choose_file(page: Any, path: Path) -> None:
    """Put a file in the Dataset tab's upload box and wait until the page lists it (slow when loaded).

    Once (of many runs) the page never listed the file within 90 s while the same test passed in 3 s
    on a rerun: the upload event was lost, not slow. So choose the file a second time before failing.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    listed = page.locator("#dataset-files").get_by_text(path.name).first
    for attempt, timeout in enumerate((45_000, 90_000)):
        page.locator("#dataset-files input[type=file]").set_input_files(str(path))
        try:
            listed.wait_for(timeout=timeout)
            return
        except PlaywrightTimeout:
            if attempt:
                raise


def upload_dataset(page: Any, archive: Path) -> str:
    open_tab(page, "Dataset")
    choose_file(page, archive)
    page.get_by_role("button", name="Import upload", exact=True).click()
    report = page.locator("#dataset-report")
    report.get_by_text("8 items").wait_for(timeout=60_000)
    assert "none skipped" in report.inner_text()
    page.locator("#dataset-gallery img").first.wait_for()
    assert page.locator("#dataset-gallery img").count() >= 8
    shot(page, "1-dataset")
    return page.locator("#dataset-folder textarea, #dataset-folder input").first.input_value()


def train_both_arms(page: Any, model_dir: Path, dataset: str) -> None:
    from playwright.sync_api import expect

    open_tab(page, "Train")
    assert page.get_by_label("Dataset (builtin = shapes; set by the Dataset tab)").input_value() == dataset
    fill(page, "train-model", str(model_dir))
    page.get_by_label("both", exact=True).check()
    fill(page, "train-steps", "3")
    fill(page, "train-rank", "4")
    fill(page, "train-k", "2")
    fill(page, "train-extra", "batch_size=4 validation.num_prompts=2 validation.steps=2")
    page.get_by_role("button", name="Start training", exact=True).click()
    command_box = page.locator("#train-command textarea")
    expect(command_box).to_have_value(re.compile(r"^soar-lite train "), timeout=30_000)
    command = command_box.input_value()
    assert "objective=both" in command and "trajectory_length=2" in command
    status = page.locator("#train-status")
    status.get_by_text("step 6/6").wait_for(timeout=TRAIN_TIMEOUT_MS)
    status.get_by_text("done").wait_for(timeout=30_000)
    page.locator("#train-plot img").first.wait_for(timeout=30_000)
    page.locator("#train-samples img").first.wait_for(timeout=30_000)
    assert page.locator("#train-samples img").count() >= 4  # 2 prompts x 2 arms
    shot(page, "2-train")


def compare_arms(page: Any) -> None:
    open_tab(page, "Compare")
    fill(page, "compare-steps", "2")
    page.get_by_role("button", name="Compare", exact=True).click()
    images = page.locator("#compare-images img")
    images.nth(2).wait_for(timeout=120_000)
    assert images.count() == 3
    text = page.locator("#compare-images").inner_text()
    assert all(arm in text for arm in ("base", "sft", "soar"))
    shot(page, "3-compare")


def download_lora(page: Any, run: str, folder: Path) -> Path:
    open_tab(page, "Export")
    page.get_by_role("button", name="Prepare downloads", exact=True).click()
    link = page.locator(f'#export-files a[download="{run}-soar.safetensors"]')
    link.wait_for(timeout=60_000)
    assert page.locator(f'#export-files a[download="{run}-sft-kohya.safetensors"]').count() == 1
    with page.expect_download() as info:
        link.click()
    target = folder / "downloaded.safetensors"
    info.value.save_as(target)
    shot(page, "4-export")
    return target


def test_upload_train_both_arms_compare_and_download_in_chromium(
    browser: Any, app_url: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect
    from safetensors import safe_open

    url, runs = app_url
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.set_default_timeout(30_000)
    goto(page, url)
    try:
        dataset = upload_dataset(page, shapes_zip(tmp_path))
        assert Path(dataset).parent == (runs / "datasets").resolve()
        train_both_arms(page, tiny_model_dir, dataset)
        run = page.locator("#train-status strong").first.inner_text()
        compare_arms(page)
        lora = download_lora(page, run, tmp_path)
        open_tab(page, "Runs")
        expect(page.locator("#runs-table")).to_contain_text(run)
        page.locator("#runs-plot img").first.wait_for()
        assert "objective=both" in page.locator("#runs-details").inner_text()
        shot(page, "5-runs")
    except BaseException:
        shot(page, "failure")
        raise
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        assert keys and all(k.startswith("transformer.") for k in keys)
        assert any(k.endswith("lora_A.weight") for k in keys) and any(
            k.endswith("lora_B.weight") for k in keys
        )
        assert f.get_tensor(keys[0]).numel() > 0


def test_hostile_zip_is_refused_with_a_message_in_the_browser(
    browser: Any, app_url: tuple[str, Path], tmp_path: Path
) -> None:
    url, runs = app_url
    archive = tmp_path / "evil.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("ok.txt", "a red circle")
        z.writestr("../escape.txt", "outside")
    archive.write_bytes(buffer.getvalue())
    before = sorted((runs / "datasets").glob("*"))
    page = browser.new_page()
    goto(page, url)
    choose_file(page, archive)
    page.get_by_role("button", name="Import upload", exact=True).click()
    page.get_by_text("points outside the archive").first.wait_for(timeout=30_000)
    shot(page, "6-refused-zip")
    assert not (runs / "escape.txt").exists() and not (runs.parent / "escape.txt").exists()
    assert sorted((runs / "datasets").glob("*")) == before, "a refused upload leaves no dataset behind"
