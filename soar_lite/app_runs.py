"""Training runs as the app sees them: a folder per run, a training subprocess per run, progress read
back from the files the trainer writes.

Why files and a subprocess: the trainer already writes everything the app shows (``metrics.jsonl``
per step, ``samples/step-N``, ``soar_lite_run.json`` with its status, the LoRA file), so the app
keeps no state beyond a small launch record (``app_run.json``): a restarted app finds every run
again, and a run that crashes or runs out of memory takes down its own process only. The command is
an argument list (``python -m soar_lite.cli train ...``), never a shell string, and every value is
validated by :func:`soar_lite.config.load_config` before launch, so nothing typed in a browser is
interpreted by a shell or mistaken for a flag.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soar_lite import config
from soar_lite.config import BUILTIN
from soar_lite.errors import UserError
from soar_lite.paths import write_text_atomic
from soar_lite.run_folder import ARMS, LORA_FILE, METRICS, RUN_RECORD, arm_names, checkpoints, read_json
from soar_lite.uploads import DATASETS

APP_RECORD = "app_run.json"  # written by the app at launch: argv, command, resolved config, pid
LOG_FILE = "train.log"  # the training process's stdout + stderr
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")

_PROCS: dict[Path, subprocess.Popen] = {}  # runs started by this app process (to poll and reap)
_LOCK = threading.Lock()


@dataclass
class TrainRequest:
    """What the Train tab asks for. Each field becomes a CLI flag or a ``key=value`` override."""

    preset: str = "cpu-tiny"
    model: str = BUILTIN
    data: str = BUILTIN
    objective: str = "soar"
    steps: int = 150
    rank: int = 8
    lr: float = 1e-3
    lambda_aux: float = 1.0
    trajectory_length: int = 6
    extra: list[str] = field(default_factory=list)  # further key=value overrides
    name: str = ""  # run folder name under the runs dir; "" = a timestamp

    def overrides(self) -> list[str]:
        """The main knobs as overrides, then the extra ones (which may refine anything)."""
        knobs = {
            "objective": self.objective,
            "steps": int(self.steps),
            "rank": int(self.rank),
            "lr": float(self.lr),
            "lambda_aux": float(self.lambda_aux),
            "trajectory_length": int(self.trajectory_length),
        }
        return [f"{k}={v}" for k, v in knobs.items()] + list(self.extra)

    def cli_args(self, output: Path) -> list[str]:
        """``soar-lite`` arguments of this run (``--model``/``--data`` left out for the built-ins)."""
        for label, value in (("preset", self.preset), ("model", self.model), ("data", self.data)):
            if not value.strip() or value.startswith("-"):
                raise UserError(f"{label} {value!r} is not a valid {label}")
        args = ["train", "--preset", self.preset]
        args += ["--model", self.model] if self.model != BUILTIN else []
        args += ["--data", self.data] if self.data != BUILTIN else []
        return [*args, "--output", str(output), "--quiet", *self.overrides()]

    def validate(self) -> config.TrainConfig:
        """The config the CLI will build from these arguments: a bad value fails here, not in the run."""
        for item in self.extra:
            if "=" not in item or item.startswith("-"):
                raise UserError(f"extra setting {item!r} is not key=value (e.g. batch_size=4)")
        extra = [f"model.path={self.model}", f"data.path={self.data}"]
        return config.load_config(self.preset, extra + self.overrides())


def parse_extra(text: str) -> list[str]:
    """Extra ``key=value`` settings typed as one line (quotes group a value with spaces; no shell)."""
    try:
        return shlex.split(text or "")
    except ValueError as exc:
        raise UserError(f"extra settings: {exc}") from None


def display_command(argv: list[str]) -> str:
    """The CLI equivalent of a run's argument list, quoted for a POSIX shell (for people to copy)."""
    return shlex.join(["soar-lite", *argv[3:]])


# ---------------------------------------------------------------- records


def _write_app_record(folder: Path, record: dict[str, Any]) -> None:
    write_text_atomic(folder / APP_RECORD, json.dumps(record, indent=2))


def _update_app_record(folder: Path, **values: Any) -> None:
    with _LOCK:
        record = read_json(folder / APP_RECORD) or {}
        record.update(values)
        _write_app_record(folder, record)


def run_config(folder: Path) -> dict[str, Any] | None:
    """The resolved config of a run: from the app's launch record, else from the trainer's record."""
    for path in (folder / APP_RECORD, folder / RUN_RECORD, *(folder / a / RUN_RECORD for a in ARMS)):
        record = read_json(path)
        if record and isinstance(record.get("config"), dict):
            return record["config"]
    return None


def sampler_settings(folder: Path) -> tuple[int, float] | None:
    """(steps, guidance) of the run's validation sampler as the trainer resolved them: the family's
    own where the preset left them (FLUX.1-dev 28 and embedded guidance 3.5, schnell 4 and 0).
    The Compare tab starts from them; None before the trainer wrote its record."""
    for path in (folder / RUN_RECORD, *(folder / a / RUN_RECORD for a in ARMS)):
        validation = ((read_json(path) or {}).get("config") or {}).get("validation")
        if isinstance(validation, dict) and "steps" in validation and "guidance_scale" in validation:
            return int(validation["steps"]), float(validation["guidance_scale"])
    return None


def run_arms(folder: Path) -> list[tuple[str, Path]]:
    """(label, folder) of each arm, in training order, as the run's objective names them (``both``:
    sft then soar; a list: its objectives); one pair for a single-objective run."""
    # the folder's config.yaml first: a CLI multi-arm run's arm records name only their own arm
    objective = config.saved_objective(folder) or (run_config(folder) or {}).get("objective")
    arms = arm_names(str(objective)) if objective else ()
    if objective is None:  # no config anywhere: the arm folders that hold a record
        arms = tuple(a for a in ARMS if (folder / a / RUN_RECORD).exists())
    if arms:
        return [(arm, folder / arm) for arm in arms]
    return [(str(objective or "run"), folder)]


def is_run(folder: Path) -> bool:
    """Whether a folder holds a run (started by the app, or by ``soar-lite train``)."""
    markers = [folder / APP_RECORD, folder / RUN_RECORD, *(folder / a / RUN_RECORD for a in ARMS)]
    return folder.is_dir() and any(m.is_file() for m in markers)


# ---------------------------------------------------------------- start, stop, state


def new_run_folder(runs_dir: Path, name: str = "") -> Path:
    """A new folder for a run: a validated name, or a timestamp; an existing run is never reused."""
    name = name.strip() or time.strftime("run-%Y%m%d-%H%M%S")
    if not _RUN_NAME.match(name) or name == DATASETS:
        raise UserError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (up to 80)")
    folder = Path(runs_dir).resolve() / name
    if folder.exists():
        raise UserError(f"a run named {name!r} exists already in {runs_dir}: pick another name")
    folder.mkdir(parents=True)
    return folder


def train_argv(request: TrainRequest, folder: Path) -> list[str]:
    """The argument list that trains ``request`` into ``folder`` (no shell ever sees it)."""
    return [sys.executable, "-m", "soar_lite.cli", *request.cli_args(folder)]


def start_training(runs_dir: Path, request: TrainRequest, max_runs: int = 1, check: Any = None) -> Path:
    """Validate, queue, and launch as soon as fewer than ``max_runs`` runs are training (one per
    GPU by default: ten starts at once must not be ten trainers competing for one card).

    The queue is the run folders themselves (``queued`` in ``app_run.json``), so a restarted app
    finds every queued request again. ``check`` (the app's folder roots) vets path settings."""
    cfg = request.validate()
    if check is not None:
        check(cfg)
    folder = new_run_folder(runs_dir, request.name)
    argv = train_argv(request, folder)
    record = {
        "argv": argv,
        "command": display_command(argv),
        "request": asdict(request),
        "config": config.config_to_dict(cfg),
        "created": time.time(),
        "pid": None,
        "stop_requested": False,
        "exit_code": None,
        "queued": time.time(),
    }
    _write_app_record(folder, record)
    launch_queued(runs_dir, max_runs)
    return folder


_QUEUE_LOCK = threading.Lock()


def queued_runs(runs_dir: Path) -> list[Path]:
    """Run folders waiting for a free slot, first come first served."""
    waiting = []
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    for folder in root.iterdir():
        record = read_json(folder / APP_RECORD) if folder.name != DATASETS else None
        if record and record.get("queued") and not is_alive(folder):
            waiting.append((float(record["queued"]), folder.name, folder))
    return [folder for *_, folder in sorted(waiting)]


def live_runs(runs_dir: Path) -> list[Path]:
    """Run folders whose training process is alive."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return [f for f in root.iterdir() if f.name != DATASETS and (f / APP_RECORD).is_file() and is_alive(f)]


def launch_queued(runs_dir: Path, max_runs: int = 1) -> list[Path]:
    """Start queued runs while fewer than ``max_runs`` train (called on every start, resume and
    app tick, and once when the app starts); returns those started now."""
    started = []
    with _QUEUE_LOCK:
        free = max_runs - len(live_runs(runs_dir))
        for folder in queued_runs(runs_dir)[: max(free, 0)]:
            argv = list((read_json(folder / APP_RECORD) or {}).get("argv") or [])
            _launch(folder, argv)
            started.append(folder)
    return started


def queue_position(folder: Path) -> int | None:
    """1 for the next run to start, None for a run that is not waiting."""
    waiting = queued_runs(Path(folder).parent)
    return waiting.index(Path(folder)) + 1 if Path(folder) in waiting else None


def _launch(folder: Path, argv: list[str]) -> None:
    """Start the training process of ``folder`` (output appended to its log) and record its pid."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (folder / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(  # an argument list: no shell ever sees the user's strings
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in the app's terminal does not reach the run
        )
    _PROCS[folder] = proc
    _update_app_record(folder, pid=proc.pid, queued=None)


def resume_training(folder: Path, max_runs: int = 1) -> str:
    """Continue a stopped or failed run from its latest checkpoint, with the settings it started
    with (a finished arm of an ``objective=both`` run is kept, an arm not started yet starts; a
    run stopped before its first checkpoint starts again). It queues like a new run."""
    folder = Path(folder)
    if is_alive(folder):
        raise UserError(f"{folder.name} is still running")
    if queue_position(folder) is not None:
        raise UserError(f"{folder.name} is queued already")
    if run_state(folder) == "done":
        raise UserError(f"{folder.name} is complete: nothing to resume")
    record = read_json(folder / APP_RECORD) or {}
    argv = list(record.get("argv") or [])
    if not argv:
        raise UserError(
            f"{folder.name} was not started from the app: "
            f"run `soar-lite train --preset {folder} --output {folder} --resume latest`"
        )
    saved = [folder, *(folder / arm for arm in ARMS)]
    fresh = not any(checkpoints(path / "checkpoints") for path in saved)
    if "--resume" not in argv:
        argv += ["--resume", "latest"]  # with no complete checkpoint the trainer starts at step 0
    _update_app_record(
        folder,
        argv=argv,
        stop_requested=False,
        exit_code=None,
        resumed=int(record.get("resumed", 0)) + 1,
        queued=time.time(),
    )
    what = "from step 0 (no complete checkpoint)" if fresh else "from the latest checkpoint"
    with (folder / LOG_FILE).open("a", encoding="utf-8") as log:
        log.write(f"\n--- resumed {what}: {display_command(argv)}\n")
    started = launch_queued(folder.parent, max_runs)
    return f"resuming {folder.name} {what}" + ("" if folder in started else " once a slot is free (queued)")


def _poll(folder: Path) -> bool | None:
    """Alive according to our own handle (also reaps the child and records its exit code)."""
    proc = _PROCS.get(folder)
    if proc is None:
        return None
    code = proc.poll()
    if code is None:
        return True
    _update_app_record(folder, exit_code=code)
    _PROCS.pop(folder, None)
    return False


def is_alive(folder: Path) -> bool:
    """Whether the training process of a run is alive (also after an app restart, from its pid)."""
    alive = _poll(folder)
    if alive is not None:
        return alive
    pid = (read_json(folder / APP_RECORD) or {}).get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except (OSError, ProcessLookupError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")  # a reused pid must not pass for our run
    with contextlib.suppress(OSError):
        return str(folder).encode() in cmdline.read_bytes()
    return True


def stop_training(folder: Path) -> str:
    """Ask a run to stop like Ctrl-C does (it saves a checkpoint first); a second call terminates it."""
    folder = Path(folder)
    if queue_position(folder) is not None:  # not started yet: leave the queue
        _update_app_record(folder, queued=None, stop_requested=True)
        return f"{folder.name} removed from the queue"
    if not is_alive(folder):
        return f"{folder.name} is not running"
    record = read_json(folder / APP_RECORD) or {}
    again = bool(record.get("stop_requested"))
    _update_app_record(folder, stop_requested=True)
    sig = signal.SIGTERM if again or os.name != "posix" else signal.SIGINT
    proc = _PROCS.get(folder)
    if proc is not None:
        proc.send_signal(sig)
    else:
        os.kill(int(record["pid"]), sig)
    return f"{'terminating' if again else 'stopping'} {folder.name} (a checkpoint is saved first)"


def run_state(folder: Path) -> str:
    """``running``, ``stopping``, ``done``, ``stopped``, ``failed`` or ``incomplete`` (a CLI run not done)."""
    folder = Path(folder)
    arms = run_arms(folder)
    statuses = [(read_json(path / RUN_RECORD) or {}).get("status") for _, path in arms]
    alive = is_alive(folder)
    record = read_json(folder / APP_RECORD)
    if statuses and all(s == "done" for s in statuses) and not alive:
        return "done"
    if alive:
        return "stopping" if record and record.get("stop_requested") else "running"
    if record is None:
        return "incomplete"
    if record.get("queued"):
        return "queued"
    return "stopped" if record.get("stop_requested") else "failed"


# ---------------------------------------------------------------- progress


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl``; a line being written right now is skipped, not an error."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def latest_samples(folder: Path, label: str) -> list[tuple[Path, str]]:
    """The validation images of the newest ``samples/step-N`` folder, captioned ``label step N: prompt``."""
    steps = sorted((folder / "samples").glob("step-*"))
    if not steps:
        return []
    newest = steps[-1]
    step = int(newest.name.split("-")[-1])
    out = []
    for image in sorted(newest.glob("*.png")):
        prompt = image.with_suffix(".txt")
        text = prompt.read_text(encoding="utf-8").strip() if prompt.is_file() else ""
        out.append((image, f"{label} step {step}: {text}"))
    return out


def log_tail(folder: Path, lines: int = 8, width: int = 140) -> str:
    """The end of the run's log (progress bars' carriage returns folded, long lines cut), for errors
    and stages: short enough that the newest line is visible without scrolling."""
    try:
        with (folder / LOG_FILE).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    folded = (line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))
    tail = [line for line in folded if line.strip()][-lines:]
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in tail)


@dataclass
class Progress:
    """Everything the Train tab shows about a run, read from its files."""

    name: str
    state: str
    step: int
    total: int
    arm: str | None  # the arm training now (None when none is)
    eta_s: float | None
    losses: list[dict[str, Any]]  # rows {"step", "loss", "series"} for a line plot
    samples: list[tuple[Path, str]]
    log: str

    def summary(self) -> str:
        """One line: state, step / total, arm, ETA."""
        parts = [f"**{self.name}**: {self.state}", f"step {self.step}/{self.total}"]
        if self.arm and self.state in ("running", "stopping"):
            parts.append(f"arm {self.arm}")
        if self.eta_s is not None and self.state == "running":
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        return " · ".join(parts)


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m 15s``: what a person reads at a glance."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _loss_rows(label: str, rows: list[dict[str, float]], with_aux: bool) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        step, main = int(row["step"]), float(row.get("loss_main", row["loss"]))
        out.append({"step": step, "loss": main, "series": f"{label} main"})
        if with_aux:
            out.append({"step": step, "loss": float(row.get("loss_aux", 0.0)), "series": f"{label} aux"})
    return out


def read_progress(folder: Path) -> Progress:
    """Step, ETA, loss curves (main and aux per arm) and the newest validation images of a run."""
    folder = Path(folder)
    cfg = run_config(folder) or {}
    steps = int(cfg.get("steps", 0))
    state = run_state(folder)
    done, losses, samples, current, times = 0, [], [], None, []
    for label, path in run_arms(folder):
        rows = read_metrics(path / METRICS)
        record = read_json(path / RUN_RECORD) or {}
        arm_steps = steps if record.get("status") == "done" else (int(rows[-1]["step"]) if rows else 0)
        if current is None and arm_steps < steps:
            current = label
        losses += _loss_rows(label, rows, with_aux=label not in ("sft", "scheduled"))  # no aux term
        samples += latest_samples(path, label)
        times += [float(r["step_time"]) for r in rows[1:] if "step_time" in r]  # step 1 includes warm-up
        done += arm_steps
    total = steps * len(run_arms(folder))
    recent = sorted(times[-10:])
    eta = recent[len(recent) // 2] * (total - done) if recent else None
    return Progress(folder.name, state, done, total, current, eta, losses, samples, log_tail(folder))


# ---------------------------------------------------------------- runs list, details, files


@dataclass
class RunSummary:
    """One line of the runs list."""

    name: str
    folder: Path
    state: str
    objective: str
    steps: int
    created: float


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every run under ``runs_dir`` (app or CLI), newest first: read from disk, so restarts keep them."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        if folder.name == DATASETS or not is_run(folder):
            continue
        cfg = run_config(folder) or {}
        created = (read_json(folder / APP_RECORD) or {}).get("created") or folder.stat().st_mtime
        out.append(
            RunSummary(
                folder.name,
                folder.resolve(),
                run_state(folder),
                str(cfg.get("objective", "?")),
                int(cfg.get("steps", 0)),
                float(created),
            )
        )
    return sorted(out, key=lambda r: r.created, reverse=True)


def resolve_run(runs_dir: Path, name: str) -> Path:
    """The folder of a run picked by name in the UI (never a path: names cannot leave the runs dir)."""
    if not name or not _RUN_NAME.match(name):
        raise UserError("pick a run first")
    folder = Path(runs_dir).resolve() / name
    if not is_run(folder):
        raise UserError(f"no run named {name!r} in {runs_dir}")
    return folder


def run_details(folder: Path) -> dict[str, Any]:
    """What the runs list shows of one run: state, command, each arm's record, the resolved config."""
    app = read_json(folder / APP_RECORD) or {}
    arms = {}
    for label, path in run_arms(folder):
        record = read_json(path / RUN_RECORD) or {}
        arms[label] = {k: record.get(k) for k in ("status", "steps_done", "steps", "base_model", "lora_file")}
    return {
        "name": folder.name,
        "state": run_state(folder),
        "command": app.get("command"),
        "arms": arms,
        "config": run_config(folder),
    }


def lora_files(folder: Path) -> dict[str, Path]:
    """The finished LoRA file of each arm (a file exists only once its arm is done: saved atomically)."""
    return {label: path / LORA_FILE for label, path in run_arms(folder) if (path / LORA_FILE).is_file()}


def export_files(folder: Path, kohya: bool = True) -> list[Path]:
    """Downloadable files named after the run and arm (every arm's own file has the same name):
    the diffusers-layout LoRA as trained, and its kohya / SAI-layout export."""
    from soar_lite.export import export_lora

    out_dir = folder / "export"
    out_dir.mkdir(exist_ok=True)
    files = []
    for label, src in lora_files(folder).items():
        for fmt in ("diffusers", "kohya") if kohya else ("diffusers",):
            suffix = "" if fmt == "diffusers" else "-kohya"
            dst = out_dir / f"{folder.name}-{label}{suffix}.safetensors"
            if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
                files.append(dst)
                continue
            if fmt == "kohya":
                export_lora(src, fmt, dst)
            else:  # the file as trained, its metadata included
                shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
                os.replace(dst.with_name(dst.name + ".tmp"), dst)
            files.append(dst)
    return files


# ---------------------------------------------------------------- compare


_COMPARE_LOCK = threading.Lock()  # one comparison at a time: each loads a model


def base_model_of(folder: Path) -> str:
    """The base model a run trained on, as resolved by the trainer (the built-in tiny base's folder)."""
    for _, path in run_arms(folder):
        model = (read_json(path / RUN_RECORD) or {}).get("base_model")
        if model:
            return str(model)
    raise UserError(f"run {folder.name} has no finished arm yet: nothing to compare")


def compare_run(
    folder: Path, prompt: str, seed: int, steps: int, guidance_scale: float
) -> tuple[Path, list[tuple[Path, str]]]:
    """Base | SFT | SOAR (the run's arms) at the same prompt and seed: the grid and each image.

    Runs :func:`soar_lite.sample.compare` in this process (one comparison at a time), so the
    images are what a diffusers user gets from the same LoRA files.
    """
    from soar_lite.sample import compare

    if not prompt.strip():
        raise UserError("type a prompt to compare")
    loras = lora_files(folder)
    if not loras:
        raise UserError(f"run {folder.name} has no finished LoRA yet")
    side = int(((run_config(folder) or {}).get("data") or {}).get("resolution") or 0) or None
    arms: dict[str, str | None] = {"base": None, **{label: str(path) for label, path in loras.items()}}
    output = folder / "compare" / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{int(seed)}"
    with _COMPARE_LOCK:
        result = compare(
            base_model_of(folder),
            arms,
            [prompt.strip()],
            [int(seed)],
            steps=int(steps),
            guidance_scale=float(guidance_scale),
            height=side,
            width=side,
            output=output,
        )
    return result.grid, [(paths[0], arm) for arm, paths in result.images.items()]
