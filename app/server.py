"""How the app is served: loopback by default, password when exposed, upload caps, no tunnel.

Kept apart from the layout (:mod:`app.main`) and free of Gradio imports at module level, so the
security defaults are tested as plain functions: what ``soar-lite app`` binds to, when it warns,
and exactly what it hands to ``Blocks.launch``.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soar_lite.app_guard import LoginRateLimit, LoginThrottle, Roots
from soar_lite.errors import UserError
from soar_lite.uploads import UploadLimits

DEFAULT_HOST = "127.0.0.1"  # only this machine can reach the app unless --host says otherwise
DEFAULT_PORT = 7860
AUTH_ENV = "SOAR_LITE_AUTH"  # user:pass from the environment, so it stays out of `ps` and images


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:pass`` -> (user, pass); the password may itself contain ':'. None or "" -> no auth."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be user:password (both non-empty), e.g. --auth alice:s3cret")
    return user, password


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0: reachable from elsewhere, as far as we know


def exposure_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """The warning printed when the app listens beyond this machine without a password."""
    if auth is not None or is_loopback(host):
        return None
    return (
        f"WARNING: soar-lite app listens on {host} without a password: anyone who can reach this "
        f"port can upload files, start training and read every run. Pass --auth user:password "
        f"(or set {AUTH_ENV}), or bind to 127.0.0.1."
    )


@dataclass
class ServeOptions:
    """Everything ``soar-lite app`` decides before Gradio starts."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    auth: tuple[str, str] | None = None
    runs_dir: Path = Path("runs")
    limits: UploadLimits = field(default_factory=UploadLimits)
    allow: tuple[Path, ...] = ()  # --allow-folder: server folders the app may use besides the runs dir
    max_runs: int = 1  # runs training at once (one GPU: one); the others wait in the queue
    throttle: LoginThrottle = field(default_factory=LoginThrottle)


def resolve_options(
    host: str | None = None,
    port: int | None = None,
    auth: str | None = None,
    runs_dir: str | Path | None = None,
    allow: list[str] | tuple[str, ...] = (),
    max_runs: int = 1,
) -> ServeOptions:
    """CLI values -> options: loopback unless told otherwise; ``--auth`` else ``$SOAR_LITE_AUTH``."""
    port = DEFAULT_PORT if port is None else int(port)
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port (1-65535)")
    if max_runs < 1:
        raise UserError(f"--max-runs {max_runs}: at least 1")
    credentials = parse_auth(auth if auth is not None else os.environ.get(AUTH_ENV))
    roots = Roots.of(runs_dir or "runs", allow)
    return ServeOptions(
        host or DEFAULT_HOST, port, credentials, roots.runs_dir, allow=roots.allowed, max_runs=max_runs
    )


def launch_kwargs(opts: ServeOptions) -> dict[str, Any]:
    """Exactly what ``Blocks.launch`` gets: no share tunnel, uploads capped, only the runs dir served,
    login attempts rate-limited per client address."""
    from starlette.middleware import Middleware

    return {
        "server_name": opts.host,
        "server_port": opts.port,
        "auth": opts.auth,
        "share": False,
        "max_file_size": opts.limits.max_upload_bytes,
        "allowed_paths": [str(opts.runs_dir)],
        "show_error": True,
        "ssr_mode": False,
        "app_kwargs": {"middleware": [Middleware(LoginRateLimit, throttle=opts.throttle)]},
    }


def private_upload_folder() -> Path:
    """A temp folder of this app process for Gradio's uploads, removed at exit (a shared
    ``/tmp/gradio`` would keep every uploaded and refused file after the app is gone). Must be set
    before Gradio is imported: it reads ``GRADIO_TEMP_DIR`` at import time."""
    folder = Path(tempfile.mkdtemp(prefix="soar-lite-uploads-"))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    atexit.register(shutil.rmtree, folder, True)
    return folder


def serve(
    host: str | None = None,
    port: int | None = None,
    auth: str | None = None,
    runs_dir: str | Path | None = None,
    allow: list[str] | tuple[str, ...] = (),
    max_runs: int = 1,
) -> int:
    """Build the app and serve it until interrupted (the body of ``soar-lite app``)."""
    opts = resolve_options(host, port, auth, runs_dir, allow, max_runs)
    warning = exposure_warning(opts.host, opts.auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    uploads_tmp = private_upload_folder()
    try:
        from app.main import build_app
    except ImportError as exc:
        raise UserError(f"the app needs gradio ({exc.name} is missing): pip install -e '.[app]'") from None
    demo = build_app(opts.runs_dir, opts.limits, opts.allow, opts.max_runs)
    allowed = ", ".join(str(p) for p in opts.allow) or "none (--allow-folder DIR adds one)"
    print(f"soar-lite app: runs in {opts.runs_dir}; other server folders: {allowed}", flush=True)
    # `docker stop` and process managers send SIGTERM: stop like Ctrl-C, so the cleanup below runs
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(**launch_kwargs(opts))
    finally:
        shutil.rmtree(uploads_tmp, ignore_errors=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
