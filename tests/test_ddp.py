"""Two gloo processes train the same LoRA as one process on the same global batch.

Both launchers users reach for are exercised: ``accelerate launch`` and ``torchrun``. On a GPU-less
machine ``accelerate launch --cpu --num_processes 2`` silently starts ONE process (accelerate 1.15),
so the accelerate case uses ``--multi_gpu``, which starts two gloo processes here; every case asserts
the run record's world size is really 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from soar_lite.lora import LORA_FILE
from soar_lite.train import RUN_RECORD

pytestmark = pytest.mark.slow


def _train(cmd_prefix: list[str], out, model, data, cache, batch: int, *extra: str) -> None:
    args = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--quiet",
        f"batch_size={batch}",
        "steps=3",
        "trajectory_length=2",
        "num_rollout_paths=2",
        "sde_rollout_type=sde",
        "lr=1e-3",
        "warmup_steps=0",
        "validation.num_prompts=0",
        f"data.cache_dir={cache}",
        *extra,
    ]
    done = subprocess.run(
        [*cmd_prefix, "-m", "soar_lite.cli", "train", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process_lora(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one")
    _train([sys.executable], out, tiny_model_dir, tiny_data_dir, out / "cache", batch=4)
    return load_file(str(out / LORA_FILE))


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_match_one_process_on_the_same_global_batch(
    launcher, one_process_lora, tiny_model_dir, tiny_data_dir, tmp_path
):
    _train(LAUNCHERS[launcher], tmp_path / "two", tiny_model_dir, tiny_data_dir, tmp_path / "cache", batch=2)
    assert json.loads((tmp_path / "two" / RUN_RECORD).read_text())["world_size"] == 2
    two = load_file(str(tmp_path / "two" / LORA_FILE))
    assert one_process_lora.keys() == two.keys()
    for key in one_process_lora:
        torch.testing.assert_close(one_process_lora[key], two[key], rtol=1e-4, atol=1e-5)


def test_processes_with_unequal_term_counts_neither_hang_nor_drift(tiny_model_dir, tiny_data_dir, tmp_path):
    """One sample per process and a 2-step sampler: a process whose t0 is in the last step runs no
    SDE path, the other does, so they run different numbers of terms. DDP syncing per backward would
    hang here; one all-reduce per optimizer step gives the single-process LoRA."""
    uneven = ("soar.num_sampling_steps=2", "soar.weighting_scheme=uniform", "steps=4")
    cache = tmp_path / "cache"
    _train([sys.executable], tmp_path / "one", tiny_model_dir, tiny_data_dir, cache, 2, *uneven)
    _train(LAUNCHERS["torchrun"], tmp_path / "two", tiny_model_dir, tiny_data_dir, cache, 1, *uneven)
    one, two = load_file(str(tmp_path / "one" / LORA_FILE)), load_file(str(tmp_path / "two" / LORA_FILE))
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
