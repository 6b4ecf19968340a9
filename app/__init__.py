"""The Gradio app: a thin UI over ``soar_lite`` (``build_app`` in :mod:`app.main`, serving in
:mod:`app.server`). Gradio is imported only when the app is built, so importing this package is cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from app.main import build_app

        return build_app
    raise AttributeError(name)
