"""Caption text: decoded whatever the editor that wrote it, trimmed, with trigger word and default.

Captions written on Windows often hold cp1252 "smart quotes" that are invalid UTF-8; other trainers
crash on them hundreds of steps in (ai-toolkit#113). Here every caption source decodes through
:func:`decode_text`, so such a file is read, not fatal. Caption dropout is *not* applied here: it is
a training-time decision (``cache.CachedData.caption_drops``), so the cache holds every caption.
"""

from __future__ import annotations

from pathlib import Path

ENCODINGS = ("utf-8-sig", "cp1252")


def decode_text(raw: bytes) -> tuple[str, str]:
    """``(text, encoding)``: UTF-8 (with or without BOM), else cp1252, else UTF-8 with replacements."""
    for encoding in ENCODINGS:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace"), "utf-8-replace"


def clean_caption(text: str) -> str:
    """Whitespace collapsed (newlines, tabs, runs of spaces) and stray separators trimmed at the ends."""
    return " ".join(text.split()).strip(" ,;")


def finish_caption(raw: str | None, default: str = "", trigger: str = "") -> str:
    """The caption training sees: cleaned, ``default`` when missing or empty, ``trigger`` in front.

    Returns "" when there is neither a caption nor a default: the caller skips that image. The
    trigger word is not repeated when the caption already starts with it.
    """
    caption = clean_caption(raw or "") or clean_caption(default)
    trigger = clean_caption(trigger)
    if not caption or not trigger or caption == trigger or caption.startswith(trigger + ","):
        return caption
    if caption.startswith(trigger + " "):
        return caption
    return f"{trigger}, {caption}"


def read_caption(path: Path, default: str = "") -> str:
    """A caption file's cleaned text (UTF-8 or cp1252); ``default`` if the file is missing or empty."""
    if not path.is_file():
        return clean_caption(default)
    return clean_caption(decode_text(path.read_bytes())[0]) or clean_caption(default)
