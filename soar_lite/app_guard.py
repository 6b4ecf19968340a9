"""What the app may touch and how often it may be asked: folder confinement and login throttling.

Why its own module, without Gradio: a browser (or any HTTP client: Gradio's API takes the same
requests) can send any string where the page shows a read-only path. So every callback that gets
a path resolves it here, on the server, to its real path (symlinks and ``..`` followed) and refuses
it unless it lies inside a folder the operator gave the app: its runs folder (with the uploaded
datasets under it) and the folders named with ``--allow-folder`` at launch (none by default).
Settings that name paths (``data.cache_dir``, ...) get the same check. Tested as plain functions.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soar_lite.config import BUILTIN, TrainConfig
from soar_lite.errors import UserError

# the settings that name a file or folder the trainer reads or writes
PATH_SETTINGS = ("model.path", "data.path", "data.cache_dir", "data.image_dir")


def real(path: str | Path) -> Path:
    """``path`` with ``~``, symlinks and ``..`` resolved, as the operating system will open it."""
    return Path(os.path.realpath(Path(path).expanduser()))


@dataclass(frozen=True)
class Roots:
    """The folders the app may read and write: the runs folder and the operator's allowed ones."""

    runs_dir: Path
    allowed: tuple[Path, ...] = ()

    @classmethod
    def of(cls, runs_dir: str | Path, allowed: Iterable[str | Path] = ()) -> Roots:
        """Resolve every root now (a symlinked root is the folder it points at)."""
        folders = []
        for folder in allowed:
            path = real(folder)
            if not path.is_dir():
                raise UserError(f"--allow-folder {folder}: not a folder")
            if path.parent == path:
                raise UserError(f"--allow-folder {folder}: the file-system root would allow everything")
            folders.append(path)
        return cls(real(runs_dir), tuple(folders))

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.runs_dir, *self.allowed)

    def contains(self, path: str | Path) -> bool:
        """Whether the real path of ``path`` is one of the roots or inside one."""
        target = real(path)
        return any(target == root or root in target.parents for root in self.all)

    def confine(self, path: str | Path, what: str = "folder") -> Path:
        """The real path of ``path``, or a one-line UserError when it lies outside every root."""
        text = str(path).strip()
        if not text or "\x00" in text:
            raise UserError(f"no {what} given")
        if not self.contains(text):
            raise UserError(f"{what} {text!r} is outside the folders this app may use: {self.describe()}")
        return real(text)

    def describe(self) -> str:
        """The roots, for error messages (the operator allows more with ``--allow-folder``)."""
        extra = ", ".join(str(p) for p in self.allowed)
        allowed = f"; allowed: {extra}" if extra else "; start the app with --allow-folder DIR to add one"
        return f"the runs folder {self.runs_dir}{allowed}"

    def check_settings(self, cfg: TrainConfig) -> None:
        """Every path-like setting of a run requested from the app lies inside the roots.

        ``model.path`` may also be ``builtin`` or a hub id (``org/name``, which is not a local path:
        it downloads into the hub cache, never into a folder the user names)."""
        for key in PATH_SETTINGS:
            section, name = key.split(".")
            value = str(getattr(getattr(cfg, section), name)).strip()
            if not value or value == BUILTIN:
                continue
            if key == "model.path" and self.allows_model(value):
                continue
            if not self.contains(value):
                raise UserError(f"{key}={value!r} is outside the folders this app may use: {self.describe()}")

    def allows_model(self, value: str) -> bool:
        """A model the app may load: ``builtin``, a hub id (``org/name``, downloaded into the hub
        cache, not into a folder the user names), or a local folder inside the roots."""
        return value == BUILTIN or _hub_id(value) or self.contains(value)


def _hub_id(value: str) -> bool:
    """``org/name`` that is not a local path: what ``from_pretrained`` downloads."""
    parts = value.split("/")
    local = value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
    return len(parts) == 2 and all(parts) and not local


# ---------------------------------------------------------------- login attempts


@dataclass
class LoginThrottle:
    """At most ``max_failures`` wrong passwords per client in ``window_s``; then every attempt from
    that client (the right password too) waits until the oldest failure leaves the window.

    Counting failures only means a user who logs in right first time never notices it; refusing
    the right password while locked out means guessing cannot continue at any speed."""

    max_failures: int = 5
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        with self._lock:
            times = self._prune(client)
            if len(times) < self.max_failures:
                return 0.0
            return max(0.0, times[0] + self.window_s - self.clock())

    def failed(self, client: str) -> None:
        """Count one wrong password from ``client``."""
        with self._lock:
            self._prune(client).append(self.clock())

    def _prune(self, client: str) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        if len(self._failures) > 10_000:  # many clients: forget those with nothing in the window
            for key in [k for k, v in self._failures.items() if not v and k != client]:
                del self._failures[key]
        return times


class LoginRateLimit:
    """ASGI middleware: ``POST .../login`` goes through :class:`LoginThrottle` per client address;
    a throttled client gets HTTP 429 with ``Retry-After`` and never reaches the password check."""

    def __init__(self, app: Any, throttle: LoginThrottle | None = None) -> None:
        self.app = app
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        is_login = scope.get("type") == "http" and scope.get("method") == "POST"
        if not is_login or not scope.get("path", "").rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.throttle.retry_after(client)
        if wait > 0:
            body = f'{{"detail": "too many login attempts: try again in {wait:.0f} s"}}'.encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", str(int(wait) + 1).encode())]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        status: list[int] = []

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] in (400, 401, 403):
            self.throttle.failed(client)
