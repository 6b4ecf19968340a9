"""Where soar-lite keeps what it builds once and reuses: the tiny base, caches.

One function so that tests can redirect everything with one environment variable
(``SOAR_LITE_HOME``) instead of patching paths module by module.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def home_dir() -> Path:
    """The soar-lite home: ``$SOAR_LITE_HOME`` or ``~/.cache/soar-lite``, created on demand."""
    root = os.environ.get("SOAR_LITE_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "soar-lite"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + rename: readers see old or new, never half."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
