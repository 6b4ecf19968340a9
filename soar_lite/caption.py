"""``soar-lite caption``: write a caption next to every image of a folder that has none.

Users of other trainers ask for auto-captioning with a choice of model again and again. Any
image-to-text model that transformers' ``AutoModelForImageTextToText`` loads works (BLIP, BLIP-2,
Florence-2, ...); the default is BLIP-large, which needs no remote code. Images that already have a
caption keep it unless ``--overwrite``; a damaged image is skipped by name, never fatal; each
caption file is written whole or not at all, so an interrupted run resumes where it stopped (it only
captions what is still missing). Nothing is loaded when there is nothing to caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from soar_lite.data.captions import clean_caption
from soar_lite.data.images import BadImage, decode_rgb
from soar_lite.data.sources import list_records
from soar_lite.errors import UserError
from soar_lite.paths import write_text_atomic

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
# Florence-2 is steered by a task token instead of a text prefix
TASK_PROMPTS = {"florence": "<MORE_DETAILED_CAPTION>"}


@dataclass
class CaptionReport:
    """What one run wrote, kept, and could not read."""

    written: list[str] = field(default_factory=list)
    kept: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        line = f"caption: wrote {len(self.written)}, kept {self.kept} existing"
        if self.failed:
            names = ", ".join(f"{name} ({why})" for name, why in self.failed[:5])
            line += f"; skipped {len(self.failed)}: {names}" + (" ..." if len(self.failed) > 5 else "")
        return line


def default_prompt(model: str) -> str:
    """The text a model is steered with: Florence-2's task token, else none (plain captioning)."""
    return next((p for key, p in TASK_PROMPTS.items() if key in model.lower()), "")


def _load(model: str, device: torch.device) -> tuple[object, torch.nn.Module]:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar (ours) for the whole folder
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(model)
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load captioning model {model!r}: {str(exc).splitlines()[0]} (a hub id needs the "
            "network the first time; a local folder works offline)"
        ) from None
    return processor, net.to(device).eval()


@torch.no_grad()
def caption_folder(
    folder: str | Path,
    model: str = DEFAULT_MODEL,
    *,
    overwrite: bool = False,
    prompt: str | None = None,
    prefix: str = "",
    caption_ext: str = ".txt",
    batch_size: int = 8,
    max_new_tokens: int = 75,
    device: str | None = None,
    progress: bool = True,
) -> CaptionReport:
    """Caption every image under ``folder`` without a (non-empty) caption file; returns the report.

    ``prompt``: text the model continues (BLIP: e.g. "a photo of"), None = the model's default;
    ``prefix``: put in front of every written caption (a trigger word, say)."""
    from soar_lite.data.sources import detect_format

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"caption: {root} is not a folder of images")
    if detect_format(root) != "folder":
        raise UserError(
            f"caption: {root} keeps its captions in a table ({detect_format(root)} format); auto-captioning "
            "writes same-name .txt files, so it takes a plain folder of images"
        )
    records = list_records(root, "folder", {"caption_ext": caption_ext, "kohya_folders": False}).records
    todo = [r for r in records if overwrite or not (r.caption or "").strip()]
    report = CaptionReport(kept=len(records) - len(todo))
    if not todo:
        return report
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor, net = _load(model, dev)
    prompt = default_prompt(model) if prompt is None else prompt
    dtype = next(net.parameters()).dtype
    bar = tqdm(total=len(todo), desc="caption", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images, names, paths = [], [], []
            for record in chunk:
                try:
                    images.append(decode_rgb(record.image.read_bytes()))
                except (BadImage, OSError) as exc:
                    report.failed.append((record.name, str(exc) or exc.__class__.__name__))
                    continue
                names.append(record.name)
                paths.append(record.image.with_suffix(caption_ext))
            if images:
                texts = _generate(processor, net, images, prompt, dtype, max_new_tokens)
                for name, path, text in zip(names, paths, texts, strict=True):
                    if not text:
                        report.failed.append((name, "the model returned an empty caption"))
                        continue
                    write_text_atomic(path, f"{prefix}{text}\n")
                    report.written.append(name)
            bar.update(len(chunk))
    finally:
        bar.close()
    return report


def _generate(
    processor: object,
    net: torch.nn.Module,
    images: Sequence,
    prompt: str,
    dtype: torch.dtype,
    max_new_tokens: int,
) -> list[str]:
    kwargs = {"images": list(images), "return_tensors": "pt"}
    if prompt:
        kwargs["text"] = [prompt] * len(images)
    inputs = processor(**kwargs).to(net.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = net.generate(**inputs, max_new_tokens=max_new_tokens)
    texts = processor.batch_decode(out, skip_special_tokens=True)
    return [clean_caption(t.replace(prompt, "", 1) if prompt.startswith("<") else t) for t in texts]
