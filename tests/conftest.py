"""Shared fixtures: tiny SD3 pipelines and datasets built in code (no download), an isolated home."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Everything soar-lite builds once (the tiny trained base, the built-in data) goes here for the whole
# test session, never into the user's ~/.cache. CI may point it at a persistent folder.
os.environ.setdefault("SOAR_LITE_HOME", tempfile.mkdtemp(prefix="soar-lite-home-"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-model tests (``pytestmark = usefixtures("one_thread")``).

    Tiny ops on a shared 2-core box: with 2 OpenMP threads and another busy process every op waits
    for a descheduled thread (a 5+5-step toy build took 38 s instead of 1.7 s). Restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny SD3 pipeline folder (seconds to build): enough to test the machinery."""
    from soar_lite.toy.tiny_sd3 import build_tiny_pipeline, save_tiny_pipeline

    return save_tiny_pipeline(build_tiny_pipeline(0), tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve captioned 32 px shapes in a kohya-style folder."""
    from soar_lite.toy.shapes import write_shapes_folder

    return write_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", 12, seed=0)


def tiny_overrides(**extra: object) -> list[str]:
    """``key=value`` overrides for a fast CPU run on the tiny fixtures."""
    values = {
        "steps": 4,
        "batch_size": 4,
        "trajectory_length": 2,
        "validation.num_prompts": 0,
        "optim.warmup_steps": 0,
        "lr": 1e-3,
        "rank": 4,
        "alpha": 8.0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests skip cleanly, with a reason, on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def ctrl_c_at(step: int) -> Iterator[None]:
    """Inside the block, training is interrupted (KeyboardInterrupt, as Ctrl-C) when it reaches
    optimizer step ``step``; the real step is back afterwards."""
    from soar_lite import train

    real = train.train_step

    def step_or_interrupt(run, cfg, state):
        if state.step == step:
            raise KeyboardInterrupt
        return real(run, cfg, state)

    train.train_step = step_or_interrupt
    try:
        yield
    finally:
        train.train_step = real
