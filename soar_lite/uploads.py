"""Datasets that arrive over the network: upload limits, a zip extractor that trusts nothing, captions.

Why its own module: the app accepts files from a browser, possibly on an exposed port. Everything
that turns those bytes into a dataset folder lives here, without Gradio, so it is tested directly
with hostile archives. An archive with any dangerous member (absolute path, ``..``, a link, a member
that inflates too much) is refused whole, before a byte is written: a half-extracted dataset would
be a silent surprise. Harmless noise (``__MACOSX/``, dot files, non-image files) is skipped and
reported.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import stat
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from soar_lite.config import DataConfig
from soar_lite.data import IMAGE_EXTS, Item, load_items, verify_items
from soar_lite.errors import UserError

MiB = 1024 * 1024
DATA_EXTS = (".txt", ".jsonl", ".csv")  # captions, imagefolder metadata, SOAR jsonl
DATASETS = "datasets"  # sub-folder of the runs dir that holds uploaded datasets
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


@dataclass(frozen=True)
class UploadLimits:
    """Caps on what one upload may put on the server's disk (a zip counts by what it inflates to).

    The one set of limits: the app enforces these, Gradio gets ``max_upload_bytes`` as its own cap,
    and the README prints :meth:`describe` word for word (a test keeps them equal)."""

    max_files: int = 5000  # images + captions per upload (loose files, or members of the zips)
    max_file_bytes: int = 64 * MiB  # one extracted or uploaded image / caption file
    max_total_bytes: int = 2048 * MiB  # everything one upload writes (zips counted expanded)
    max_upload_bytes: int = 1024 * MiB  # one file as sent by the browser (a zip included)
    max_ratio: float = 100.0  # inflated / compressed size of one member or a whole zip: a zip bomb
    ratio_min_bytes: int = 1 * MiB  # tiny members compress oddly; the ratio rule starts here

    def describe(self) -> str:
        """The limits in one sentence, as the README and the Dataset tab state them."""
        return (
            f"{self.max_upload_bytes // MiB} MiB per uploaded file (a zip included), "
            f"{self.max_file_bytes // MiB} MiB per image or caption file, "
            f"{self.max_total_bytes // MiB} MiB written per upload (zips counted expanded), "
            f"{self.max_files} files per upload, and no zip or member over "
            f"{self.ratio_min_bytes // MiB} MiB that inflates more than {self.max_ratio:g}x"
        )


@dataclass
class ImportReport:
    """What an upload became: the dataset folder, the files written, and what was left out and why."""

    folder: Path
    written: list[Path] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _wanted(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS + DATA_EXTS


def _noise(parts: tuple[str, ...]) -> bool:
    """macOS resource forks and hidden files: present in many zips, never training data."""
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def member_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The relative path parts of a zip member, or UserError for anything that could escape ``dest``."""
    name = info.filename.replace("\\", "/")  # zips written on Windows may use backslashes
    if "\x00" in name:
        raise UserError(f"refused archive: member {name!r} has a NUL byte in its name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UserError(f"refused archive: member {name!r} is an absolute path")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise UserError(f"refused archive: member {name!r} points outside the archive ('..')")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UserError(f"refused archive: member {name!r} is a symbolic link")
    if not parts:
        raise UserError(f"refused archive: member {info.filename!r} has an empty name")
    return parts


def _check_sizes(info: zipfile.ZipInfo, total: int, limits: UploadLimits) -> int:
    """Declared sizes against the limits (extraction re-counts the real bytes: headers can lie)."""
    name = info.filename
    if info.file_size > limits.max_file_bytes:
        raise UserError(
            f"refused archive: {name!r} inflates to {info.file_size / MiB:.0f} MiB, "
            f"over the {limits.max_file_bytes / MiB:.0f} MiB per-file limit"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size >= limits.ratio_min_bytes and ratio > limits.max_ratio:
        raise UserError(
            f"refused archive: {name!r} inflates {ratio:.0f}x (limit {limits.max_ratio:.0f}x): a zip bomb?"
        )
    total += info.file_size
    if total > limits.max_total_bytes:
        raise UserError(
            f"refused archive: contents exceed the {limits.max_total_bytes / MiB:.0f} MiB upload limit"
        )
    return total


Plan = list[tuple[zipfile.ZipInfo, Path]]


def plan_zip(archive: zipfile.ZipFile, limits: UploadLimits) -> tuple[Plan, list[str]]:
    """Check every member before anything is written: (members to extract, names ignored and why)."""
    plan: Plan = []
    ignored: list[str] = []
    total = 0
    seen: set[str] = set()
    for info in archive.infolist():
        parts = member_parts(info)
        if info.is_dir():
            continue
        rel = "/".join(parts)
        if _noise(parts) or not _wanted(rel):
            ignored.append(f"{rel}: not an image, caption or metadata file")
            continue
        if rel.lower() in seen:
            raise UserError(f"refused archive: {rel!r} appears twice")
        seen.add(rel.lower())
        total = _check_sizes(info, total, limits)
        plan.append((info, Path(*parts)))
        if len(plan) > limits.max_files:
            raise UserError(f"refused archive: more than {limits.max_files} files")
    # many members each just under the per-member ratio rule: the archive as a whole is the bomb
    packed = sum(info.compress_size for info, _ in plan)
    if total >= limits.ratio_min_bytes and total / max(packed, 1) > limits.max_ratio:
        raise UserError(
            f"refused archive: it inflates {total / max(packed, 1):.0f}x as a whole "
            f"(limit {limits.max_ratio:.0f}x): a zip bomb?"
        )
    return plan, ignored


def _copy_capped(src: IO[bytes], dst: Path, cap: int, budget: list[int]) -> None:
    """Stream ``src`` into a new file ``dst``, never writing more than ``cap`` nor the shared budget."""
    written = 0
    out = dst.open("xb")  # "x": never follow or replace something already there
    try:
        with out:
            while chunk := src.read(MiB):
                written += len(chunk)
                budget[0] -= len(chunk)
                if written > cap or budget[0] < 0:
                    raise UserError(
                        f"refused archive: {dst.name!r} inflates beyond its declared size or the limit"
                    )
                out.write(chunk)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def safe_extract_zip(zip_path: Path, dest: Path, limits: UploadLimits = UploadLimits()) -> ImportReport:
    """Extract a dataset zip into ``dest`` (created), or refuse it whole with a one-line UserError."""
    dest = Path(dest)
    report = ImportReport(dest)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{Path(zip_path).name} is not a readable zip file ({exc})") from None
    with archive:
        plan, report.ignored = plan_zip(archive, limits)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            _extract(archive, plan, dest, limits, report)
        except BaseException:
            for path in report.written:  # no half dataset left behind
                path.unlink(missing_ok=True)
            raise
    return report


def _extract(
    archive: zipfile.ZipFile,
    plan: Plan,
    dest: Path,
    limits: UploadLimits,
    report: ImportReport,
) -> None:
    root = dest.resolve()
    budget = [limits.max_total_bytes]
    for info, rel in plan:
        target = dest / rel
        if root not in target.resolve().parents:  # belt and braces after member_parts
            raise UserError(f"refused archive: {info.filename!r} resolves outside the dataset")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as src:
                _copy_capped(src, target, min(info.file_size, limits.max_file_bytes), budget)
        except FileExistsError:
            raise UserError(f"refused upload: {rel.as_posix()!r} exists already (named twice?)") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise UserError(f"refused archive: {info.filename!r} is corrupt ({exc})") from None
        report.written.append(target)


def safe_filename(name: str) -> str:
    """A browser-supplied file name reduced to a plain base name (no folders, no odd characters)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    cleaned = _SAFE_NAME.sub("_", base).strip(" .")
    if not cleaned:
        raise UserError(f"file name {name!r} has nothing usable in it")
    return cleaned


def new_dataset_dir(runs_dir: Path, label: str = "upload") -> Path:
    """A fresh, uniquely named folder under ``RUNS/datasets`` for one upload."""
    base = Path(runs_dir) / DATASETS
    stem = f"{safe_filename(label)}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        folder = base / (stem if n == 0 else f"{stem}-{n}")
        if not folder.exists():
            folder.mkdir(parents=True)
            return folder
    raise UserError(f"too many datasets named {stem} in {base}")


def import_uploads(
    files: list[Path], dest: Path, names: list[str] | None = None, limits: UploadLimits = UploadLimits()
) -> ImportReport:
    """Loose images + captions and/or zips (as sent by the browser) into one dataset folder ``dest``.

    ``names`` are the names the user's files had (the server's temp copies may be renamed); they
    are reduced to base names, so nothing from the browser decides where a file lands.
    """
    names = names or [Path(f).name for f in files]
    if len(files) > limits.max_files:
        raise UserError(f"too many files ({len(files)}); the limit is {limits.max_files} per upload")
    report = ImportReport(Path(dest))
    report.folder.mkdir(parents=True, exist_ok=True)
    budget = limits.max_total_bytes
    for path, name in zip(files, names, strict=True):
        size = Path(path).stat().st_size
        if name.lower().endswith(".zip"):
            if size > limits.max_upload_bytes:
                raise UserError(f"{name} is {size / MiB:.0f} MiB, over the upload limit")
            sub = safe_extract_zip(Path(path), report.folder, _with_total(limits, budget))
            budget -= sum(p.stat().st_size for p in sub.written)
            report.written += sub.written
            report.ignored += [f"{name}: {reason}" for reason in sub.ignored]
            continue
        clean = safe_filename(name)
        if not _wanted(clean):
            report.ignored.append(f"{clean}: not an image, caption, metadata file or .zip")
            continue
        if size > limits.max_file_bytes or size > budget:
            raise UserError(f"{clean} ({size / MiB:.1f} MiB) is over the upload limits")
        target = report.folder / clean
        if target.exists():
            raise UserError(f"two uploaded files are named {clean}")
        shutil.copyfile(path, target)
        budget -= size
        report.written.append(target)
    return report


def _with_total(limits: UploadLimits, budget: int) -> UploadLimits:
    from dataclasses import replace

    return replace(limits, max_total_bytes=max(budget, 0))


# ---------------------------------------------------------------- what the data stage will see


@dataclass
class DatasetReport:
    """The data stage's own verdict on a dataset: usable items, and what it skips and why."""

    folder: Path
    items: list[Item]
    skipped: dict[str, list[str]]  # reason -> names (the data stage's categories)
    summary: str
    error: str | None = None


def dataset_report(path: str | Path) -> DatasetReport:
    """Run the data stage's own listing and checks (not a copy of its rules) on ``path``, the full
    decode included: a truncated image passes the header check and is skipped only by the cache
    stage, so the page must not list it as usable."""
    folder = Path(path)
    try:
        report = load_items(DataConfig(path=str(folder)))
    except UserError as exc:
        return DatasetReport(folder, [], {}, str(exc), str(exc))
    distinct = list(dict.fromkeys(report.items))  # kohya folder repeats: each image shown once
    good, bad = verify_items(distinct)
    skipped = dict(report.skips.by_reason)
    for reason, names in bad.by_reason.items():
        skipped.setdefault(reason, []).extend(names)
    summary = report.summary()
    if len(bad):
        summary += f"; {len(bad)} more skipped when decoded: {bad.summary().split(': ', 1)[1]}"
    if not good:
        message = f"no usable captioned images in {folder} ({bad.summary()})"
        return DatasetReport(folder, [], skipped, message, message)
    return DatasetReport(folder, good, skipped, summary)


def write_captions(folder: str | Path, captions: dict[str, str], caption_ext: str = ".txt") -> int:
    """Save edited captions next to their images; keys are image paths relative to ``folder``.

    Only image files inside ``folder`` get a caption: a request naming any other file (``notes.yaml``,
    an existing ``important.txt``) must not make a ``.txt`` appear or be replaced beside it."""
    root = Path(folder).resolve()
    count = 0
    for rel, caption in captions.items():
        image = (root / rel).resolve()
        is_image = image.suffix.lower() in IMAGE_EXTS
        if root not in image.parents or not image.is_file() or not is_image:
            raise UserError(f"{rel!r} is not an image of this dataset")
        text = " ".join(str(caption).split())
        image.with_suffix(caption_ext).write_text(text + "\n", encoding="utf-8")
        count += 1
    return count


def discard_uploads(files: list[str] | list[Path], temp_root: str | Path) -> int:
    """Delete the server's temporary copies of uploaded files once they are stored or refused.

    Only files inside ``temp_root`` (Gradio's upload folder) are touched, whatever path a request
    names: this must never become a way to delete other files. Returns how many were removed."""
    root = Path(temp_root).resolve()
    removed = 0
    for name in files:
        path = Path(name).resolve()
        if root not in path.parents or not path.is_file():
            continue
        path.unlink(missing_ok=True)
        removed += 1
        if path.parent != root:  # Gradio keeps each upload in a folder of its own
            with contextlib.suppress(OSError):
                path.parent.rmdir()
    return removed
