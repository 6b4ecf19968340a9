"""Where captioned images come from: four on-disk formats, one record shape.

* ``folder``: images with same-name caption files (kohya style: ``a.png`` + ``a.txt``), recursive;
  kohya's ``<repeats>_<class>`` sub-folders (``10_ohwx dog/``) repeat their images and caption the
  uncaptioned ones with the class text, as kohya does (``data.kohya_folders``);
* ``imagefolder``: Hugging Face's layout, ``metadata.jsonl`` or ``metadata.csv`` with ``file_name``
  and a caption column (``text``), at the root or under ``<split>/``;
* ``hf``: a ``datasets`` dataset saved with ``save_to_disk`` (image and caption columns by name);
* ``soar_jsonl``: the SOAR reference's JSONL (``md5``, ``caption_en``, ``bw``, ``bh``) with images
  ``<md5>.jpg`` in a folder.

Listing only reads captions and names; images are checked later (``data.load_items``) so that
every source gets the same bad-input handling.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soar_lite.data.captions import decode_text
from soar_lite.data.images import IMAGE_EXTS
from soar_lite.errors import UserError

FORMATS = ("auto", "folder", "imagefolder", "hf", "soar_jsonl")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
KOHYA_FOLDER = re.compile(r"^(\d{1,3})_(.*)$")  # "10_ohwx dog"; 4-digit years ("2024_trip") are not repeats


@dataclass
class Record:
    """One listed example before checks: a name for messages, where its bytes are, its raw caption."""

    name: str
    image: Path  # the image file, or the dataset folder of an ``hf`` row
    caption: str | None
    row: int = -1
    split: str = ""
    column: str = ""
    aspect: float = 0.0  # requested width/height (SOAR jsonl bw/bh), 0 = the image's own
    dup_key: str = ""  # records sharing a key are duplicates: the first is kept
    encoding: str = "utf-8"
    repeats: int = 1  # kohya "<repeats>_<class>" folder: times the image appears in an epoch
    class_caption: str = ""  # ... and the caption of its images that have none


@dataclass
class Listing:
    """The records of a source plus what was refused while listing (name, reason)."""

    fmt: str
    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def detect_format(path: Path) -> str:
    """The format of ``path`` from what it holds (see the module docstring)."""
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return "soar_jsonl"
        raise UserError(f"data path {path} is a file: expected a folder, or a SOAR .jsonl file")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hf"
    folders = [path, *(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))]
    if any((folder / name).is_file() for folder in folders for name in METADATA_FILES):
        return "imagefolder"
    return "folder"


def list_records(path: Path, fmt: str, options: dict[str, str]) -> Listing:
    """Records of the dataset at ``path``; ``options``: caption_ext, image_column, caption_column,
    split, image_dir (each may be "" for the format's default)."""
    if not path.exists():
        raise UserError(f"data path {str(path)!r} does not exist")
    check_not_system_folder(path)
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        listers = {"folder": _folder, "imagefolder": _imagefolder, "hf": _hf, "soar_jsonl": _soar_jsonl}
        return listers[fmt](path, options)
    except OSError as exc:  # a folder or file inside that cannot be read (permissions, a dead mount)
        where = exc.filename or path
        raise UserError(f"cannot read the data at {where}: {exc.strerror or exc}") from None


SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin",
                  "/sys", "/usr", "/var", "/home", "/root", "/tmp")  # fmt: skip


def check_not_system_folder(path: Path) -> None:
    """A dataset is a folder of its own: a file-system root or a system folder would be walked
    whole (every file on the machine, unreadable ones included) before failing, so it is refused."""
    real = path.resolve()
    if real.parent == real or str(real) in SYSTEM_FOLDERS or real == Path.home():
        raise UserError(
            f"data path {path} is a system folder, not a dataset: point at the folder of your images"
        )


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder(root: Path, options: dict[str, str]) -> Listing:
    if not root.is_dir():
        raise UserError(f"data path {root} is not a folder")
    out = Listing("folder")
    caption_ext = options.get("caption_ext") or ".txt"
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTS or not path.is_file() or _hidden(path, root):
            continue
        caption_file = path.with_suffix(caption_ext)
        caption, encoding = (None, "")
        if caption_file.is_file():
            caption, encoding = decode_text(caption_file.read_bytes())
        name = str(path.relative_to(root))
        record = Record(name, path, caption, dup_key=str(path.with_suffix("")), encoding=encoding)
        if options["kohya_folders"]:
            record.repeats, record.class_caption = _kohya_folder(path, root)
        out.records.append(record)
    return out


def _kohya_folder(path: Path, root: Path) -> tuple[int, str]:
    """(repeats, class text) from the nearest ``<repeats>_<class>`` folder above ``path`` in ``root``."""
    for folder in path.relative_to(root).parents:
        match = KOHYA_FOLDER.match(folder.name)
        if match and int(match.group(1)) > 0:
            return int(match.group(1)), match.group(2).strip()
    return 1, ""


def _read_table(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a metadata.jsonl / metadata.csv, any encoding :func:`decode_text` reads;
    a line that is not a JSON object becomes ``{"__error__": reason}``."""
    text = decode_text(path.read_bytes())[0]
    if path.suffix == ".csv":
        return list(enumerate(csv.DictReader(io.StringIO(text)), 2))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = {"__error__": "not JSON"}
        rows.append((number, row if isinstance(row, dict) else {"__error__": "not a JSON object"}))
    return rows


def _imagefolder(root: Path, options: dict[str, str]) -> Listing:
    split = options.get("split") or "train"
    found = [root / n for n in METADATA_FILES] + [root / split / n for n in METADATA_FILES]
    found = [p for p in found if p.is_file()]
    if not found:
        raise UserError(f"{root} has no metadata.jsonl or metadata.csv (at the top or under {split}/)")
    out = Listing("imagefolder")
    column = options.get("caption_column") or "text"
    for meta in found:
        rows = _read_table(meta)
        columns = {key for _, row in rows for key in row if key != "__error__"}
        if rows and "file_name" not in columns:
            raise UserError(f"{meta} has no file_name column (it has: {', '.join(sorted(columns))})")
        if rows and column not in columns:
            raise UserError(
                f"{meta} has no caption column {column!r}; set data.caption_column to one of: "
                f"{', '.join(sorted(columns - {'file_name'}))}"
            )
        for number, row in rows:
            if "__error__" in row:
                out.skipped.append((f"{meta.name}:{number}", row["__error__"]))
                continue
            file = meta.parent / str(row.get("file_name") or "")
            name = str(file.relative_to(root)) if file.is_relative_to(root) else str(file)
            if not row.get("file_name") or not file.is_file():
                out.skipped.append((name, f"listed in {meta.name} but missing"))
                continue
            caption = row.get(column)
            out.records.append(
                Record(name, file, None if caption is None else str(caption), dup_key=str(file))
            )
    return out


@functools.lru_cache(maxsize=4)
def open_hf(folder: str, split: str, column: str) -> Any:
    """A saved ``datasets`` dataset (one split) whose image column yields undecoded bytes/paths."""
    import datasets

    try:
        ds = datasets.load_from_disk(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"cannot read the saved dataset {folder}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{folder} has no split {split!r}; set data.split to one of: {', '.join(ds)}")
        ds = ds[split]
    if column in ds.column_names and isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def hf_image_bytes(value: Any, folder: Path) -> bytes:
    """Bytes of one image cell: ``{"bytes", "path"}`` of an Image column, or a path string."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if not value:
        return b""
    path = Path(value) if Path(value).is_absolute() else folder / str(value)
    return path.read_bytes() if path.is_file() else b""


def _hf(root: Path, options: dict[str, str]) -> Listing:
    split = options.get("split") or "train"
    image_col = options.get("image_column") or "image"
    caption_col = options.get("caption_column") or "text"
    ds = open_hf(str(root), split, image_col)
    for col, key in ((image_col, "image_column"), (caption_col, "caption_column")):
        if col not in ds.column_names:
            raise UserError(
                f"{root} has no column {col!r}; set data.{key} to one of: {', '.join(ds.column_names)}"
            )
    out = Listing("hf")
    captions = ds[caption_col]
    for row, caption in enumerate(captions):
        if isinstance(caption, (list, tuple)):  # several captions per image: the first non-empty one
            caption = next((str(c) for c in caption if c), None)
        out.records.append(
            Record(
                f"{root.name}[{row}]", root, None if caption is None else str(caption), row, split, image_col
            )
        )
    return out


def _soar_jsonl(path: Path, options: dict[str, str]) -> Listing:
    if not path.is_file():
        raise UserError(f"{path} is not a .jsonl file (format soar_jsonl)")
    folder = Path(options.get("image_dir") or path.parent)
    column = options.get("caption_column") or "caption_en"
    out = Listing("soar_jsonl")
    for number, row in _read_table(path):
        where = f"{path.name}:{number}"
        if "__error__" in row or not row.get("md5"):
            out.skipped.append((where, row.get("__error__", "no md5 field")))
            continue
        md5 = str(row["md5"])
        image = folder / f"{md5}.jpg"
        if not image.is_file():
            image = next(
                (p for p in sorted(folder.glob(f"{md5}.*")) if p.suffix.lower() in IMAGE_EXTS), image
            )
        if not image.is_file():
            out.skipped.append((where, f"image missing ({md5}.jpg not in {folder})"))
            continue
        aspect = 0.0
        try:
            aspect = float(row["bw"]) / float(row["bh"]) if row.get("bw") and row.get("bh") else 0.0
        except (TypeError, ValueError, ZeroDivisionError):
            aspect = 0.0
        caption = row.get(column)
        out.records.append(
            Record(f"{md5}.jpg", image, None if caption is None else str(caption), aspect=aspect, dup_key=md5)
        )
    return out
