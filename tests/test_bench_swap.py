"""``soar-lite bench swap`` reports what it measured: ratios to no swap, base-weight bytes on the
device that match a count of the tiny model's own parameters, and block copies within the
planner's bound."""

from __future__ import annotations

import json

import pytest
import torch

from soar_lite.bench import swap as bench


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_swap_record(tmp_path):
    from soar_lite.bench.step import build_model

    out = tmp_path / "swap.json"
    record = bench.main(out, layers=6, batch=2, k=1, repeats=1, warmup=0)
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    rows = record["variants"]
    assert set(rows) == {"swap_0", "swap_3", "swap_6"}
    assert rows["swap_0"]["time_ratio_to_no_swap"] == 1.0 and rows["swap_0"]["block_copies_per_step"] == 0

    model, _ = build_model(6)  # the same model, counted here from its parameters (float32)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * 4 for b in model.buffers())  # the positional table is a buffer
    block = sum(p.numel() * 4 for p in model.transformer_blocks[-1].parameters() if not p.requires_grad)
    assert rows["swap_0"]["base_weights_on_device_peak_mb"] * 2**20 == pytest.approx(frozen)
    # all 6 swapped: two blocks in flight at the peak; 3 swapped: one block's worth saved
    assert rows["swap_6"]["base_weights_on_device_peak_mb"] * 2**20 == pytest.approx(frozen - 4 * block)
    assert rows["swap_3"]["base_weights_on_device_peak_mb"] * 2**20 == pytest.approx(frozen - block)
    for name in ("swap_3", "swap_6"):
        row = rows[name]
        assert 0 < row["block_copies_per_step"] <= row["planned_block_copies_per_step"]
        assert row["copied_mb_per_step"] * 2**20 == pytest.approx(row["block_copies_per_step"] * block)
        assert row["median_step_s"] > 0
    assert record["summary"]["all_memory_ratio"] < record["summary"]["half_memory_ratio"] < 1.0
