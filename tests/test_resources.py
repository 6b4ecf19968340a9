"""Package data: presets and model configs are found inside the installed package, also from a wheel.

The wheel test is the one that matters: an editable checkout finds files next to the source tree
whatever the code does, so only an install elsewhere shows whether the data travels with the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from soar_lite import config, plan, resources

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "soar_lite"
# What a source tree holds that is not the package's source: never copied into the wheel build.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "tests",
    "runs",
    "build",
    "dist",
    ".venv",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "test-artifacts",
    "benchmarks",
)


def test_every_shipped_file_is_found_by_its_stem():
    presets = sorted(p.stem for p in (PACKAGE / "presets").glob("*.yaml"))
    configs = sorted(p.stem for p in (PACKAGE / "model_configs").glob("*.json"))
    assert "cpu-tiny" in presets and "sd3.5-medium" in configs
    assert config.preset_names() == presets
    assert list(resources.data_files(resources.MODEL_CONFIGS, ".json")) == configs


def test_a_file_dropped_into_the_data_folder_is_listed_and_loads(tmp_path: Path, monkeypatch):
    """New presets (e.g. another family's tiers) need no code change: the folder is the list."""
    shutil.copytree(PACKAGE / "presets", tmp_path / "presets")
    text = (tmp_path / "presets" / "24gb.yaml").read_text(encoding="utf-8")
    (tmp_path / "presets" / "zz-new.yaml").write_text(text.replace("--preset 24gb", "--preset zz-new"))
    (tmp_path / "presets" / "notes.txt").write_text("not a preset")
    monkeypatch.setattr(resources.resources, "files", lambda package: tmp_path)
    assert "zz-new" in config.preset_names() and "notes" not in config.preset_names()
    assert config.load_config("zz-new").steps == config.build_config(config.load_preset("24gb")).steps


def test_missing_data_folder_lists_nothing_and_an_unknown_preset_names_the_choices(tmp_path, monkeypatch):
    monkeypatch.setattr(resources.resources, "files", lambda package: tmp_path)
    assert resources.data_files("nowhere", ".yaml") == {}
    monkeypatch.undo()
    with pytest.raises(config.UserError, match=r"unknown preset 'nope'; choose one of: .*cpu-tiny"):
        config.preset_path("nope")


def test_model_configs_come_from_package_data():
    assert plan.transformer_config("sd3.5-medium")["num_layers"] == 24
    assert plan.transformer_config("stabilityai/stable-diffusion-3.5-large")["num_layers"] == 38


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_outside_the_checkout_lists_presets_and_plans(tmp_path: Path):
    """Build the wheel, install it alone (``--no-deps``) into a venv that sees the already installed
    dependencies (``--system-site-packages``, so torch is not reinstalled: seconds, not minutes), and
    run the console script from a folder that is not the checkout, with no ``PYTHONPATH``.
    ``--force-reinstall``: pip otherwise counts the outer environment's (editable) soar-lite as
    already installed and installs nothing, and the venv would quietly import the checkout."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("soar_lite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [
        p.relative_to(REPO).as_posix()
        for p in [
            *PACKAGE.glob("presets/*"),
            *PACKAGE.glob("model_configs/*"),
            *(f for f in PACKAGE.glob("toy/base/**/*") if f.is_file()),  # the shipped tiny base
        ]
    ]
    assert any(name.endswith("toy/base/manifest.json") for name in shipped)
    assert shipped and set(shipped) <= names, sorted(set(shipped) - names)

    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [
            *pip,
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--force-reinstall",
            wheel,
        ],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = run(str(python), "-c", "import soar_lite; print(soar_lite.__file__)")
    assert Path(where.strip()).is_relative_to(venv), where  # the wheel's copy, not the checkout's
    script = str(venv / "bin" / "soar-lite")
    listed = run(script, "presets")
    assert [line.split()[0] for line in listed.splitlines()] == config.preset_names()
    assert '"steps": 150' in run(script, "presets", "cpu-tiny")
    check = "from soar_lite.toy import shipped; print(shipped.damaged_files())"
    assert run(str(python), "-c", check).strip() == "[]"  # the installed base matches its hashes
    planned = run(script, "plan", "--preset", "24gb", "--model", "sd3.5-medium")
    assert "GiB" in planned and "sd3.5-medium" in planned, planned
