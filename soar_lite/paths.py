"""Where soar-lite keeps what it builds once and reuses: the tiny base, caches.

One function so that tests can redirect everything with one environment variable
(``SOAR_LITE_HOME``) instead of patching paths module by module.
"""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """The soar-lite home: ``$SOAR_LITE_HOME`` or ``~/.cache/soar-lite``, created on demand."""
    root = os.environ.get("SOAR_LITE_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "soar-lite"
    path.mkdir(parents=True, exist_ok=True)
    return path
