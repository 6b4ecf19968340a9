"""The Gradio layout: Dataset, Train, Compare, Export and Runs tabs over ``soar_lite`` functions.

Callbacks only translate between widgets and :mod:`soar_lite.uploads` / :mod:`soar_lite.app_runs`
(where the logic is, tested without a browser); a :class:`~soar_lite.errors.UserError` becomes a
Gradio error toast with the same one-line message the CLI prints. Training never runs in this
process: the Train tab starts ``soar-lite train`` as a subprocess and reads its files back.
"""

from __future__ import annotations

import functools
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from app.charts import loss_chart
from soar_lite import app_runs, config, uploads
from soar_lite.app_guard import Roots
from soar_lite.caption import DEFAULT_MODEL, caption_folder
from soar_lite.config import BUILTIN
from soar_lite.errors import UserError

GALLERY_MAX = 48  # thumbnails shown per dataset (the table lists every image)
THUMB = 192
TICK_S = 2.0  # progress refresh while a run is live
LIVE = ("queued", "running", "stopping")
QUEUE_TICK_S = 2.0  # how often queued runs are checked for a free slot
IMAGE_TYPES = [*uploads.IMAGE_EXTS, *uploads.DATA_EXTS, ".zip"]


def _ui(fn: Callable[..., Any]) -> Callable[..., Any]:
    """UserError -> a Gradio error with the CLI's one-line message (no traceback in the browser)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    return wrapper


@dataclass
class Widgets:
    """Components that events of one tab update in another."""

    data_path: gr.Textbox | None = None
    run_pickers: tuple[gr.Dropdown, ...] = ()


# ---------------------------------------------------------------- dataset tab


def _thumb(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            return img if img.width >= 64 else img.resize((THUMB, THUMB), Image.Resampling.NEAREST)
    except OSError:
        return None


def show_dataset(path: str) -> tuple[str, list, pd.DataFrame, str]:
    """Report, thumbnails and caption table of a dataset, exactly as the data stage sees it."""
    report = uploads.dataset_report(path)
    lines = [f"**{report.summary}**" if report.error is None else f"**Not usable:** {report.error}"]
    for reason, names in sorted(report.skipped.items()):
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        lines.append(f"- skipped, {reason}: {shown}")
    gallery = []
    for item in report.items[:GALLERY_MAX]:
        thumb = _thumb(item.image) if item.row < 0 else None
        if thumb is not None:
            gallery.append((thumb, item.caption))
    rows = [[item.name or str(item.image), item.caption] for item in report.items if item.row < 0]
    rows += [[name, ""] for name in report.skipped.get("no caption", [])]
    table = pd.DataFrame(rows, columns=["image", "caption"])
    return "\n".join(lines), gallery, table, str(report.folder)


def upload_folder() -> Path:
    """Where Gradio keeps uploaded files (``serve`` points it at a folder of this app's own)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


@_ui
def import_upload(files: list[str] | None, runs_dir: Path, limits: uploads.UploadLimits) -> tuple:
    """Uploaded images/captions/zips -> a new dataset folder under RUNS/datasets (guarded), shown.

    Only Gradio's own upload copies are read (a request naming any other server file is refused),
    and they are deleted once stored or refused: nothing uploaded lingers in the temp folder."""
    if not files:
        raise UserError("choose images with their .txt captions, or one .zip, first")
    temp = upload_folder()
    try:
        paths = [Path(f).resolve() for f in files]
        if any(temp not in p.parents for p in paths):
            raise UserError("uploads are read only from the app's upload folder")
        if not all(p.is_file() for p in paths):  # deleted once imported or refused: a second click
            raise UserError("these uploads were imported or refused already: choose the files again")
        folder = uploads.new_dataset_dir(runs_dir)
        try:
            report = uploads.import_uploads(paths, folder, [p.name for p in paths], limits)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    finally:
        uploads.discard_uploads(list(files), temp)
    text, gallery, table, path = show_dataset(str(folder))
    if report.ignored:
        text += "\n\nNot imported: " + "; ".join(report.ignored[:10])
    return text, gallery, table, path, path


@_ui
def use_server_folder(path: str, roots: Roots) -> tuple:
    """A dataset already on the server (any format the data stage reads), inside the app's folders."""
    if not path.strip():
        raise UserError("type the path of a dataset folder on the server")
    text, gallery, table, folder = show_dataset(str(roots.confine(path, "dataset folder")))
    return text, gallery, table, folder, folder


@_ui
def save_captions(folder: str, table: pd.DataFrame, roots: Roots) -> tuple:
    """Write the edited captions as .txt files next to their images, then re-check the dataset."""
    if not folder:
        raise UserError("import or choose a dataset first")
    folder = str(roots.confine(folder, "dataset folder"))
    edits = {str(r["image"]): str(r["caption"]) for _, r in table.iterrows() if str(r["caption"]).strip()}
    count = uploads.write_captions(folder, edits)
    text, gallery, new_table, _ = show_dataset(folder)
    return f"Saved {count} captions.\n\n{text}", gallery, new_table


@_ui
def caption_missing(folder: str, model: str, roots: Roots) -> tuple:
    """Auto-caption the images of the dataset in use that have no caption, then re-check it."""
    if not folder:
        raise UserError("import or choose a dataset first")
    folder = str(roots.confine(folder, "dataset folder"))
    model = (model or DEFAULT_MODEL).strip()
    if not roots.allows_model(model):
        raise UserError(f"captioning model {model!r} is outside the folders this app may use")
    report = caption_folder(folder, (model or DEFAULT_MODEL).strip(), progress=False)
    text, gallery, table, _ = show_dataset(folder)
    return f"{report.summary()}\n\n{text}", gallery, table


def dataset_tab(runs_dir: Path, limits: uploads.UploadLimits, widgets: Widgets, roots: Roots) -> None:
    """Upload or point at a dataset; see the data stage's verdict; edit captions."""
    gr.Markdown(
        "Upload images with same-name `.txt` captions (or one `.zip` of them), or point at a dataset "
        f"folder on the server ({roots.describe()}). Limits: {limits.describe()}."
    )
    with gr.Row():
        with gr.Column():
            files = gr.File(
                label="Images + captions, or a .zip",
                file_count="multiple",
                file_types=IMAGE_TYPES,
                elem_id="dataset-files",
            )
            upload_btn = gr.Button("Import upload", variant="primary")
        with gr.Column():
            server_path = gr.Textbox(label="…or a dataset folder on the server", placeholder="/data/my-set")
            folder_btn = gr.Button("Use this folder")
            folder = gr.Textbox(label="Dataset in use", interactive=False, elem_id="dataset-folder")
    report = gr.Markdown(elem_id="dataset-report")
    gallery = gr.Gallery(
        label="Images (first 48)", columns=8, height=300, object_fit="contain", elem_id="dataset-gallery"
    )
    table = gr.Dataframe(
        headers=["image", "caption"], label="Captions (edit, then save)", interactive=True, wrap=True
    )
    save_btn = gr.Button("Save captions")
    with gr.Row():
        caption_model = gr.Textbox(DEFAULT_MODEL, label="Captioning model (hub id or folder)", scale=3)
        caption_btn = gr.Button("Caption images that have none", scale=1)
    outputs = [report, gallery, table, folder, widgets.data_path]
    upload = functools.partial(import_upload, runs_dir=runs_dir, limits=limits)
    upload_btn.click(upload, [files], outputs, api_name="import_upload")
    folder_btn.click(
        functools.partial(use_server_folder, roots=roots),
        [server_path],
        outputs,
        api_name="use_server_folder",
    )
    save_btn.click(
        functools.partial(save_captions, roots=roots), [folder, table], [report, gallery, table],
        api_name="save_captions",
    )  # fmt: skip
    caption_btn.click(
        functools.partial(caption_missing, roots=roots), [folder, caption_model], [report, gallery, table],
        api_name="caption_missing",
    )  # fmt: skip


# ---------------------------------------------------------------- train tab


def preset_knobs(preset: str) -> tuple:
    """The preset's own model and main knobs, shown when a preset is picked."""
    try:
        cfg = config.load_config(preset)
    except UserError as exc:
        raise gr.Error(str(exc)) from None
    return (
        cfg.model.path,
        cfg.steps,
        cfg.lora.rank,
        cfg.optim.lr,
        cfg.soar.lambda_aux,
        cfg.soar.trajectory_length,
    )


def preset_fit(preset: str, model: str) -> str:
    """The memory planner's verdict for a preset on a model, shown under the form (no weights read)."""
    from soar_lite.plan import plan, suggest, tier_of

    overrides = [f"model.path={(model or BUILTIN).strip()}"]
    try:
        cfg = config.load_config(preset, overrides)
        result = plan(cfg, cfg.model.path, tier_of(preset))
    except UserError as exc:
        return f"Memory planner: {exc}"
    line = f"Memory planner: ~{result.total:.1f} GiB peak while training"
    if result.fits is not None:
        line += f" ({'fits' if result.fits else 'does NOT fit'} a {result.tier_gb:g} GB card)"
    if result.fits is False:
        found = suggest(preset, overrides, cfg.model.path, result.tier_gb)
        line += f"; it fits with `{' '.join(found[0])}` in More settings" if found else ""
    if result.cache is not None and result.cache.mode != "none":
        line += (
            f"; caching: text encoders `{result.cache.mode}`-offloaded, ~{result.cache.gpu_peak_gb:.1f} GiB"
        )
    return line + ". `soar-lite plan --vram GB` fits any other card."


@_ui
def start(runs_dir: Path, roots: Roots, max_runs: int, *values: Any) -> tuple:
    """Start (or queue) a run from the form, validated first and its path settings confined to the
    app's folders; show its command; switch the pickers to it."""
    preset, model, data, objective, steps, rank, lr, lam, k, extra, name = values
    if preset not in config.preset_names():
        raise UserError(f"preset {preset!r}: pick one of the shipped presets")
    request = app_runs.TrainRequest(
        preset=preset,
        model=(model or BUILTIN).strip(),
        data=(data or BUILTIN).strip(),
        objective=objective,
        steps=int(steps),
        rank=int(rank),
        lr=float(lr),
        lambda_aux=float(lam),
        trajectory_length=int(k),
        extra=app_runs.parse_extra(extra),
        name=name or "",
    )
    folder = app_runs.start_training(runs_dir, request, max_runs, check=roots.check_settings)
    record = app_runs.read_json(folder / app_runs.APP_RECORD) or {}
    picks = _pickers(run_names(runs_dir), folder.name)
    return (folder.name, record.get("command", ""), *progress_view(folder), gr.Timer(active=True), *picks)


def _pickers(names: list[str], value: str | None) -> list[gr.Dropdown]:
    """Updates for the three run pickers: one object each (Gradio consumes an update as it applies it)."""
    return [gr.Dropdown(choices=names, value=value) for _ in range(3)]


def run_names(runs_dir: Path) -> list[str]:
    """Run folder names, newest first (what the pickers offer)."""
    return [r.name for r in app_runs.list_runs(runs_dir)]


def progress_view(folder: Path) -> tuple:
    """(summary, loss curves, validation images, log tail) of a run."""
    p = app_runs.read_progress(folder)
    return p.summary(), loss_chart(p.losses), [(str(path), cap) for path, cap in p.samples], p.log


@_ui
def refresh(run: str | None, runs_dir: Path) -> tuple:
    """Timer tick: re-read the run's files; the timer stops itself once the run is over."""
    if not run:
        return "", None, [], "", gr.Timer(active=False)
    folder = app_runs.resolve_run(runs_dir, run)
    view = progress_view(folder)
    live = app_runs.run_state(folder) in LIVE
    return (*view, gr.Timer(active=live))


@_ui
def stop(run: str | None, runs_dir: Path) -> str:
    """Stop this page's run like Ctrl-C (checkpoint first); a second press terminates it."""
    if not run:
        raise UserError("no run started from this page yet")
    return app_runs.stop_training(app_runs.resolve_run(runs_dir, run))


def train_tab(runs_dir: Path, widgets: Widgets, roots: Roots, max_runs: int) -> tuple[gr.State, gr.Timer]:
    """The form, start/stop and the live view; returns the page's current run and its refresh timer."""
    model0, steps0, rank0, lr0, lam0, k0 = preset_knobs("cpu-tiny")
    with gr.Row():
        preset = gr.Dropdown(config.preset_names(), value="cpu-tiny", label="Preset (VRAM tier)")
        model = gr.Textbox(
            model0, label="Model (folder or hub id; builtin = tiny SD3 base)", elem_id="train-model"
        )
        objective = gr.Radio(  # both = sft,soar; a list trains one arm per objective
            ["sft", "soar", "scheduled", "reflexflow", "both", "sft,soar,scheduled,reflexflow"],
            value="soar",
            label="Objective",
        )
    with gr.Row():
        widgets.data_path.render()
        name = gr.Textbox(label="Run name (optional)", placeholder="run-<date>-<time>")
    with gr.Row():
        steps = gr.Number(steps0, label="steps", precision=0, minimum=1, elem_id="train-steps")
        rank = gr.Number(rank0, label="rank", precision=0, minimum=1, elem_id="train-rank")
        lr = gr.Number(lr0, label="lr", minimum=0)
        lam = gr.Number(lam0, label="lambda_aux", minimum=0)
        k = gr.Number(k0, label="trajectory_length", precision=0, minimum=1, elem_id="train-k")
    fit = gr.Markdown(preset_fit("cpu-tiny", model0), elem_id="train-fit")
    extra = gr.Textbox(
        label="More settings (key=value ...)",
        placeholder="batch_size=4 validation.every=50",
        elem_id="train-extra",
    )
    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary")
        stop_btn = gr.Button("Stop", variant="stop")
    status = gr.Markdown(elem_id="train-status")
    command = gr.Textbox(
        label="Equivalent command",
        lines=2,
        max_lines=4,
        interactive=False,
        buttons=["copy"],
        elem_id="train-command",
    )
    plot = gr.Image(label="Loss (main, aux)", type="pil", interactive=False, height=320, elem_id="train-plot")
    samples = gr.Gallery(
        label="Validation images", columns=6, height=220, object_fit="contain", elem_id="train-samples"
    )
    log = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, interactive=False, elem_id="train-log")
    run = gr.State(None)
    timer = gr.Timer(TICK_S, active=False)
    preset.change(preset_knobs, [preset], [model, steps, rank, lr, lam, k]).then(
        preset_fit, [preset, model], [fit]
    )
    model.blur(preset_fit, [preset, model], [fit])
    form = [preset, model, widgets.data_path, objective, steps, rank, lr, lam, k, extra, name]
    live = [status, plot, samples, log]
    start_btn.click(
        functools.partial(start, runs_dir, roots, max_runs),
        form,
        [run, command, *live, timer, *widgets.run_pickers],
        api_name="start",
    )
    timer.tick(functools.partial(refresh, runs_dir=runs_dir), [run], [*live, timer])
    stop_btn.click(functools.partial(stop, runs_dir=runs_dir), [run], [status])
    return run, timer


# ---------------------------------------------------------------- compare, export, runs


@_ui
def compare(run: str | None, prompt: str, seed: float, steps: float, cfg: float, runs_dir: Path) -> tuple:
    """Base | SFT | SOAR of a run at one prompt and seed."""
    folder = app_runs.resolve_run(runs_dir, run or "")
    grid, images = app_runs.compare_run(folder, prompt, int(seed), int(steps), float(cfg))
    return [(str(path), arm) for path, arm in images], str(grid)


def compare_tab(runs_dir: Path, picker: gr.Dropdown) -> None:
    """Prompt, seed, steps and CFG in; the run's arms side by side and the labelled grid out."""
    gr.Markdown("The same prompt and seed through the base model and each trained arm of a run.")
    with gr.Row():
        prompt = gr.Textbox("a red circle at the top left", label="Prompt", scale=3, elem_id="compare-prompt")
        seed = gr.Number(0, label="Seed", precision=0)
        steps = gr.Number(20, label="Steps", precision=0, minimum=1, elem_id="compare-steps")
        cfg = gr.Number(4.5, label="CFG (SD3) / guidance (FLUX.1)", minimum=0, elem_id="compare-cfg")
    go = gr.Button("Compare", variant="primary")
    images = gr.Gallery(
        label="base | each arm", columns=4, height=360, object_fit="contain", elem_id="compare-images"
    )
    grid = gr.Image(label="Labelled grid", type="filepath", height=240)
    go.click(
        functools.partial(compare, runs_dir=runs_dir), [picker, prompt, seed, steps, cfg], [images, grid]
    )
    picker.change(functools.partial(compare_defaults, runs_dir=runs_dir), [picker], [steps, cfg])


def compare_defaults(run: str | None, runs_dir: Path) -> tuple:
    """A picked run's own sampler settings (its family's: FLUX.1-schnell samples in 4 steps)."""
    try:
        found = app_runs.sampler_settings(app_runs.resolve_run(runs_dir, run or ""))
    except UserError:
        found = None
    return (gr.update(), gr.update()) if found is None else found


@_ui
def export(run: str | None, runs_dir: Path) -> tuple:
    """The run's LoRA files (and kohya exports), ready to download."""
    folder = app_runs.resolve_run(runs_dir, run or "")
    files = app_runs.export_files(folder)
    if not files:
        raise UserError(f"run {folder.name} has no finished LoRA yet")
    return [str(f) for f in files], f"{len(files)} files from `{folder}`"


def export_tab(runs_dir: Path, picker: gr.Dropdown) -> None:
    """Download links for a run's LoRA files."""
    gr.Markdown(
        "Each arm's LoRA in the diffusers layout (loads with `pipe.load_lora_weights(file)` and in "
        "ComfyUI), and as a kohya / SAI-layout export (`-kohya`) for kohya-based tools."
    )
    go = gr.Button("Prepare downloads", variant="primary")
    note = gr.Markdown()
    files = gr.File(label="LoRA files", file_count="multiple", interactive=False, elem_id="export-files")
    go.click(functools.partial(export, runs_dir=runs_dir), [picker], [files, note])


def runs_table(runs_dir: Path) -> pd.DataFrame:
    """One row per run: name, state (a queued run with its place in the queue), objective, steps, created."""
    waiting = app_runs.queued_runs(runs_dir)
    rows = [
        [
            r.name,
            f"queued (#{waiting.index(r.folder) + 1})" if r.folder in waiting else r.state,
            r.objective,
            r.steps,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)),
        ]
        for r in app_runs.list_runs(runs_dir)
    ]
    return pd.DataFrame(rows, columns=["run", "state", "objective", "steps", "created"])


@_ui
def show_run(run: str | None, runs_dir: Path) -> tuple:
    """Record, newest samples, loss curves and log of one run."""
    if not run:
        return {}, [], None, ""
    folder = app_runs.resolve_run(runs_dir, run)
    _, chart, samples, log = progress_view(folder)
    return app_runs.run_details(folder), samples, chart, log


@_ui
def resume(picked: str | None, runs_dir: Path, max_runs: int = 1) -> tuple:
    """Continue the picked run from its latest checkpoint; the Train tab's live view follows it."""
    folder = app_runs.resolve_run(runs_dir, picked or "")
    message = app_runs.resume_training(folder, max_runs)
    return message, folder.name, gr.Timer(active=True), runs_table(runs_dir)


def runs_tab(
    runs_dir: Path, picker: gr.Dropdown, tab: gr.Tab, live_run: gr.State, timer: gr.Timer, max_runs: int = 1
) -> gr.Dataframe:
    """Every run in the runs dir (read from disk: an app restart loses nothing), one in detail;
    a stopped or failed run resumes from its latest checkpoint."""
    with gr.Row():
        picker.render()
        again = gr.Button("Refresh list", scale=1)
        resume_btn = gr.Button("Resume", scale=1, elem_id="runs-resume")
    resume_status = gr.Markdown(elem_id="runs-resume-status")
    table = gr.Dataframe(
        runs_table(runs_dir), label=f"Runs in {runs_dir}", interactive=False, elem_id="runs-table"
    )
    details = gr.JSON(label="Run record", elem_id="runs-details")
    samples = gr.Gallery(label="Newest validation images", columns=6, height=220, object_fit="contain")
    plot = gr.Image(label="Loss (main, aux)", type="pil", interactive=False, height=320, elem_id="runs-plot")
    log = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, interactive=False)
    show = functools.partial(show_run, runs_dir=runs_dir)
    picker.change(show, [picker], [details, samples, plot, log])
    tab.select(lambda p: (runs_table(runs_dir), *show(p)), [picker], [table, details, samples, plot, log])
    again.click(
        lambda p: (gr.Dropdown(choices=run_names(runs_dir), value=p), runs_table(runs_dir)),
        [picker],
        [picker, table],
    )
    resume_btn.click(
        functools.partial(resume, runs_dir=runs_dir, max_runs=max_runs),
        [picker],
        [resume_status, live_run, timer, table],
    )
    return table


def on_load(runs_dir: Path) -> tuple:
    """A (re)loaded page: fresh run lists, and the live view of a run still training, if any."""
    runs = app_runs.list_runs(runs_dir)
    names = [r.name for r in runs]
    live = next((r.name for r in runs if r.state in LIVE), None)
    picks = _pickers(names, names[0] if names else None)
    return (*picks, runs_table(runs_dir), live, gr.Timer(active=live is not None))


def _picker(picker: gr.Dropdown, runs_dir: Path) -> None:
    """Render a shared run picker with its own refresh button."""
    with gr.Row():
        picker.render()
        again = gr.Button("Refresh list", scale=1)
    again.click(lambda p: gr.Dropdown(choices=run_names(runs_dir), value=p), [picker], [picker])


_PUMPS: set[Path] = set()


def start_queue(runs_dir: Path, max_runs: int) -> None:
    """Launch queued runs as slots free up, in the background, once per runs folder; queued runs
    left by an earlier app process start too (the queue is on disk)."""
    if runs_dir in _PUMPS:
        return
    _PUMPS.add(runs_dir)

    def pump() -> None:
        while True:
            try:
                app_runs.launch_queued(runs_dir, max_runs)
            except Exception as exc:  # a bad folder must not end the queue for every other run
                print(f"soar-lite app: queue: {exc}", flush=True)
            time.sleep(QUEUE_TICK_S)

    threading.Thread(target=pump, name="soar-lite-queue", daemon=True).start()


def build_app(
    runs_dir: str | Path = "runs",
    limits: uploads.UploadLimits | None = None,
    allow: tuple[str | Path, ...] | list[str | Path] = (),
    max_runs: int = 1,
) -> gr.Blocks:
    """The whole app over one runs folder (runs and uploaded datasets live there) and the server
    folders the operator allowed (``--allow-folder``); nothing else is read or written."""
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    limits = limits or uploads.UploadLimits()
    roots = Roots.of(runs_dir, allow)
    start_queue(runs_dir, max_runs)
    names = run_names(runs_dir)
    with gr.Blocks(title="soar-lite", analytics_enabled=False) as demo:
        # Shared between tabs: made first, rendered in their tab (events may name them before that).
        widgets = Widgets(
            data_path=gr.Textbox(
                BUILTIN, label="Dataset (builtin = shapes; set by the Dataset tab)", render=False
            ),
            run_pickers=tuple(
                gr.Dropdown(names, value=names[0] if names else None, label="Run", scale=4, render=False)
                for _ in range(3)
            ),
        )
        compare_picker, export_picker, runs_picker = widgets.run_pickers
        gr.Markdown(
            "# soar-lite\nSOAR / SFT LoRA fine-tuning for SD3 and SD3.5 on one GPU (or the tiny CPU base)."
        )
        with gr.Tabs():
            with gr.Tab("Dataset"):
                dataset_tab(runs_dir, limits, widgets, roots)
            with gr.Tab("Train"):
                run, timer = train_tab(runs_dir, widgets, roots, max_runs)
            with gr.Tab("Compare"):
                _picker(compare_picker, runs_dir)
                compare_tab(runs_dir, compare_picker)
            with gr.Tab("Export"):
                _picker(export_picker, runs_dir)
                export_tab(runs_dir, export_picker)
            with gr.Tab("Runs") as tab:
                table = runs_tab(runs_dir, runs_picker, tab, run, timer, max_runs)
        demo.load(functools.partial(on_load, runs_dir), None, [*widgets.run_pickers, table, run, timer])
    return demo
