"""The run folder, owned in one place: its file names, its record, its lock, its leftovers.

Why its own module: ``train`` writes a run folder, ``sample``, ``export`` and the app read it, and
before this module each declared the names it needed (three copies that had to be kept in sync by a
test) and imported the others to get them. Everything here is plain files and the standard library
(no torch, no model), so the app and the CLI can read, lock and check a run folder in milliseconds
and none of the heavy modules has to import another to know where a file is.

Layout of one run (``objective=both`` or a list nests one such folder per arm, e.g. ``sft/`` then ``soar/``)::

    OUTPUT/
      .soar_lite.lock                  held (flock) by the process training here, with who it is
      soar_lite_run.json               the record: status (running|done|failed|stopped), steps, config
      config.yaml                      the resolved settings (``--preset OUTPUT`` reruns them)
      metrics.jsonl                    one JSON row per logged step
      checkpoints/step-NNNNNN/         complete checkpoints (``state.pt`` is written last)
      checkpoints/.tmp-step-*          a checkpoint being written (removed at the next start)
      samples/step-NNNNNN/NN.png|txt   validation images and their prompts
      pytorch_lora_weights.safetensors the LoRA (written before the record says ``done``)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from soar_lite.errors import UserError
from soar_lite.paths import write_text_atomic

RUN_RECORD = "soar_lite_run.json"
RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMA_FILE = "pytorch_lora_weights_ema.safetensors"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LOGS = "logs"
LOCK_FILE = ".soar_lite.lock"
# every sub-folder an arm can have: the objectives (config.OBJECTIVES)
ARMS = ("sft", "soar", "scheduled", "reflexflow")
STEP_DIR = re.compile(r"^step-(\d{6,})$")
TMP_STEP_PREFIX = ".tmp-step-"
_TMP_FILE = re.compile(r"^\.tmp-\d+-[0-9a-f]{8}-|\.tmp-\d+$")  # paths.write_text_atomic, lora.atomic_save


# ---------------------------------------------------------------- names


def arm_names(objective: str) -> tuple[str, ...]:
    """The arms of a run, in training order: ``both`` is sft, soar; a comma list its names; () for one
    objective (the run folder itself holds its LoRA)."""
    names = ("sft", "soar") if objective == "both" else tuple(objective.split(","))
    return names if len(names) > 1 else ()


def arm_folders(folder: Path, objective: str) -> list[Path]:
    """The folders that hold a LoRA each: one per arm of a multi-arm run, else the folder itself."""
    return [folder / arm for arm in arm_names(objective)] or [folder]


def sample_folder(folder: Path, step: int) -> Path:
    """Where the validation images of ``step`` go."""
    return folder / SAMPLES / f"step-{step:06d}"


def checkpoint_folder(folder: Path, step: int) -> Path:
    """The final name of the checkpoint of ``step``."""
    return folder / CHECKPOINTS / f"step-{step:06d}"


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a ``checkpoints/`` folder), oldest first; temporary
    folders and folders without ``state.pt`` (written last) are never listed."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


# ---------------------------------------------------------------- the record


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file, or None when missing or half-written (the trainer may be writing it right now)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_record(folder: Path) -> dict[str, Any] | None:
    """The trainer's record of the run in ``folder`` (None when there is none yet)."""
    return read_json(folder / RUN_RECORD)


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Replace the record atomically; on a full disk, overwrite in place (truncation frees blocks),
    so that a run that failed for lack of space can still say so."""
    text = json.dumps(record, indent=2)
    try:
        write_text_atomic(folder / RUN_RECORD, text)
    except OSError:
        (folder / RUN_RECORD).write_text(text, encoding="utf-8")


def mark_ended(folder: Path, status: str, reason: str) -> bool:
    """Set a ``running`` record to ``failed`` or ``stopped`` with the reason (best effort: a record
    that cannot be written is left as it was, the error itself still reaches the user)."""
    record = read_record(folder)
    if record is None or record.get("status") != "running":
        return False
    record.update(status=status, reason=reason, ended=time.time())
    with contextlib.suppress(OSError):
        write_record(folder, record)
        return True
    return False


def finished(folder: Path, steps: int) -> bool:
    """A run in ``folder`` that completed ``steps`` steps and has its LoRA file on disk."""
    record = read_record(folder) or {}
    done = record.get("status") == "done" and int(record.get("steps_done", 0)) >= steps
    return done and (folder / LORA_FILE).is_file()


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds anything of a run (a record or checkpoints), in itself or its arms."""
    places = [folder, *(folder / arm for arm in ARMS)]
    return any((p / RUN_RECORD).exists() or (p / CHECKPOINTS).exists() for p in places)


def has_results(folder: Path) -> bool:
    """Whether ``folder`` (or an arm) holds something a rerun would destroy: a complete checkpoint,
    a LoRA file or a finished record. A run killed before its first checkpoint has none."""
    for place in [folder, *(folder / arm for arm in ARMS)]:
        if checkpoints(place / CHECKPOINTS) or (place / LORA_FILE).exists():
            return True
        if (read_record(place) or {}).get("status") == "done":
            return True
    return False


def clear(folder: Path) -> None:
    """Empty a run folder but keep its lock file (held by us: deleting it would let a second run
    lock a new file beside ours)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_stale_temp(folder: Path) -> list[Path]:
    """Delete what killed writes left behind: ``checkpoints/.tmp-step-*`` folders and ``.tmp-*``
    files of atomic writers. Only called while holding the folder's lock, so none is live."""
    removed: list[Path] = []
    root = folder / CHECKPOINTS
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TMP_STEP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_file() and _TMP_FILE.search(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


# ---------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class RunLock:
    """An exclusive lock on a run folder, held for the whole run.

    ``flock`` on ``OUTPUT/.soar_lite.lock``: the kernel drops it when the holder dies, however it
    dies (SIGKILL included), so a lock is never stale while held, and a lock file left by a killed
    run is simply taken over. The file's JSON (pid, host, start time, command) is only there to
    tell a second run who holds the folder. Where ``flock`` is missing (Windows), a holder whose
    pid is gone on this host counts as stale.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder we replaced, if any

    def acquire(self) -> RunLock:
        """Take the lock or raise a one-line UserError naming who holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = self._read(fd)
            if not self._lock(fd, holder):
                raise UserError(f"{self.folder} is in use by another run ({describe_holder(holder)}): "
                                "wait for it to end, stop it, or pick another --output")  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        if holder:
            self.took_over = holder
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv[:8])[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            return {}

    @staticmethod
    def _lock(fd: int, holder: dict[str, Any]) -> bool:
        try:
            import fcntl
        except ImportError:  # no flock: trust a live pid on this host
            pid = holder.get("pid")
            mine = holder.get("host") == socket.gethostname()
            return not (isinstance(pid, int) and mine and pid != os.getpid() and _pid_alive(pid))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # e.g. ENOLCK on some network file systems
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise UserError(f"cannot lock the run folder ({exc.strerror}): use a local disk") from None
        return True

    def release(self) -> None:
        """Empty the file (nobody holds it now) and drop the lock; the file itself stays."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host, since 14:02:11: soar-lite train ...`` for the refusal message."""
    if not holder:
        return "holder unknown"
    since = time.strftime("%H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {since}: {holder.get('command', '?')}"


# ---------------------------------------------------------------- write failures


WRITE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system"}  # fmt: skip


def _write_failure(exc: BaseException) -> str | None:
    """What kind of write failure ``exc`` is (None: not one). safetensors reports I/O errors as a
    SafetensorError whose text carries the OS error code."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return WRITE_ERRNOS[exc.errno]
    if type(exc).__name__ == "SafetensorError":
        text = str(exc)
        for code, what in WRITE_ERRNOS.items():
            if f"code: {code}," in text:
                return what
        if "StorageFull" in text or "No space left" in text:
            return "no space left"
    return None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def write_error(exc: BaseException, path: Path, needed: int = 0) -> UserError | None:
    """The one-line error for a failed write of ``path`` (about ``needed`` bytes), or None when
    ``exc`` is not a write failure."""
    what = _write_failure(exc)
    if what is None:
        return None
    target = Path(getattr(exc, "filename", None) or path)
    line = f"cannot write {target}: {what}"
    if what in ("no space left", "disk quota exceeded"):
        probe = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        need = f", about {_mib(needed)} needed" if needed else ""
        line += f" ({_mib(free)} free{need}); free some space or pick another --output"
    else:
        line += "; check the folder's owner and mode, or pick another --output"
    return UserError(line + "; earlier checkpoints are intact")


@contextlib.contextmanager
def guard_write(path: Path, needed: int = 0) -> Iterator[None]:
    """Turn a disk-full / permission failure while writing ``path`` into the one-line UserError."""
    try:
        yield
    except Exception as exc:
        error = write_error(exc, path, needed)
        if error is None:
            raise
        raise error from None
