"""CI plumbing: .ci/run calls the Docker check, the Makefile runs what README says, and README's account
of what the Docker check covers is the script's own command (so the two cannot drift apart).

The Docker check itself needs root, a daemon and ~10 minutes: CI runs it (``.ci/docker``), not pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER_CHECK = REPO / ".ci" / "docker"
TRAIN_IN_CONTAINER = "soar-lite train --preset cpu-tiny steps=5 --output /data/runs/ci-tiny"


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_docker_check_after_the_tests():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert lines.index(".ci/docker") > lines.index("python -m pytest -q")
    assert os.access(DOCKER_CHECK, os.X_OK)


def test_the_docker_check_builds_this_dockerfile_on_the_stand_in_and_trains_what_readme_says():
    script = DOCKER_CHECK.read_text(encoding="utf-8")
    assert '--build-arg "BASE_IMAGE=$BASE"' in script
    assert "--iptables=false --ip-forward=false --bridge=none" in script
    assert 'kill "$DOCKERD_PID"' in script and "trap cleanup EXIT" in script
    assert f'docker exec "$APP" {TRAIN_IN_CONTAINER} ' in script
    docker_section = " ".join(_readme().split("## Docker", 1)[1].split("\n## ", 1)[0].split())
    assert f"`{TRAIN_IN_CONTAINER}`" in docker_section
    assert "Not tested here" in docker_section and "--gpus all" in docker_section


def test_the_docker_check_skips_cleanly_when_told_to():
    done = subprocess.run(
        [str(DOCKER_CHECK)], env={**os.environ, "SOAR_LITE_CI_DOCKER": "0"}, capture_output=True, text=True
    )
    assert done.returncode == 0 and "docker check SKIPPED: SOAR_LITE_CI_DOCKER=0" in done.stdout


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(
        [shellcheck, str(DOCKER_CHECK), str(REPO / ".ci" / "run")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_targets_run_the_documented_commands():
    done = subprocess.run(
        ["make", "-n", "test", "lint", "docker-check", "bench", "PYTHON=python"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = done.stdout.splitlines()
    assert commands[:5] == [
        "python -m pytest -q",
        "ruff check .",
        "ruff format --check soar_lite",
        "hadolint Dockerfile",
        ".ci/docker",
    ]
    assert any("bench step" in c for c in commands) and any("bench cache" in c for c in commands)
    development = _readme().split("## Development", 1)[1]
    for target in ("make test", "make lint", "make docker-check", "make bench"):
        assert target in development
