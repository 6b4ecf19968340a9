"""``soar-lite bench swap`` reports what it measured: ratios to no swap, base-weight bytes on the
device that match a count of the tiny model's own parameters, and block copies within the
planner's bound."""

from __future__ import annotations

import json

import pytest

from soar_lite.bench import swap as bench

pytestmark = pytest.mark.usefixtures("one_thread")


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
    # SD3's last block is smaller (context_pre_only): count each block
    blocks = model.transformer_blocks
    sizes = [sum(p.numel() * 4 for p in b.parameters() if not p.requires_grad) for b in blocks]
    assert rows["swap_0"]["base_weights_on_device_peak_mb"] * 2**20 == pytest.approx(frozen)
    for n in (3, 6):  # the swapped blocks leave but for the two largest, in flight at the peak
        row, swapped = rows[f"swap_{n}"], sizes[-n:]
        expected = frozen - sum(swapped) + sum(sorted(swapped)[-2:])
        assert row["base_weights_on_device_peak_mb"] * 2**20 == pytest.approx(expected)
        assert 0 < row["block_copies_per_step"] <= row["planned_block_copies_per_step"]
        copied, copies = row["copied_mb_per_step"] * 2**20, row["block_copies_per_step"]
        assert min(swapped) * copies <= copied <= max(swapped) * copies
        assert row["median_step_s"] > 0
    assert record["summary"]["all_memory_ratio"] < record["summary"]["half_memory_ratio"] < 1.0
