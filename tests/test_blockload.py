"""Block-by-block loading (issue 14): the same model as diffusers' ``from_pretrained``, and at no
moment a swapped block on the device or a resident block left in system RAM.

The reference is diffusers' own loader (independent code); where the memory is at each step is
watched from outside through ``on_group``, with the ``meta`` device standing in for the GPU: a
tensor moved there holds no bytes, so the real bytes left are exactly what system RAM holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soar_lite import blockload, lora, swap
from soar_lite.config import LoraConfig
from soar_lite.errors import UserError
from soar_lite.swap import BlockSwap, blocks_of
from tests.test_swap import SD3_TARGETS, _sd3, _step

pytestmark = pytest.mark.usefixtures("one_thread")


def _builders():
    from soar_lite.toy.tiny_flux import tiny_flux_transformer
    from soar_lite.toy.tiny_qwen_image import tiny_qwen_transformer
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    return {
        "sd3": lambda: tiny_sd3_transformer(0, num_layers=4),
        "flux": lambda: tiny_flux_transformer(0, num_layers=2, num_single_layers=2),
        "qwen": lambda: tiny_qwen_transformer(0, num_layers=3),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's tiny transformer saved as a pipeline's ``transformer`` folder."""
    out = {}
    for name, build in _builders().items():
        folder = tmp_path_factory.mktemp(name) / "transformer"
        build().save_pretrained(folder)
        out[name] = folder
    return out


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blockwise_load_equals_from_pretrained(saved, family, dtype):
    folder = saved[family]
    cls = type(_builders()[family]())
    ref = cls.from_pretrained(folder, dtype=dtype)
    got = blockload.load_blockwise(cls, folder, dtype, "none", "cpu", swap_blocks=2)
    a, b = _tensors(ref), _tensors(got)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].dtype == a[key].dtype, key
        assert torch.equal(b[key], a[key]), key
    assert not any(p.requires_grad for p in got.parameters())


def test_a_sharded_checkpoint_loads_the_same(tmp_path):
    model = _builders()["flux"]()
    model.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    assert (tmp_path / "transformer" / blockload.INDEX).is_file()
    got = blockload.load_blockwise(type(model), tmp_path / "transformer", torch.float32, "none", "cpu")
    for key, value in _tensors(model).items():
        assert torch.equal(_tensors(got)[key], value), key


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen"])
def test_swapped_blocks_never_reach_the_device_and_ram_holds_only_them(saved, family):
    """meta stands in for the GPU: after every group, the bytes still real (in RAM) are exactly the
    swapped blocks placed so far, and no swapped block ever has a tensor on the device."""
    folder = saved[family]
    cls = type(_builders()[family]())
    count = 2
    seen: list[tuple[str, int, int]] = []

    def watch(prefix: str, model: torch.nn.Module) -> None:
        blocks = blocks_of(model)
        placed = [b for b in blocks if not all(t.is_meta for t in _tensors(b).values())]
        ram = sum(t.numel() * t.element_size() for t in _tensors(model).values() if not t.is_meta)
        parked = sum(
            t.numel() * t.element_size()
            for b in blocks[len(blocks) - count :]
            if b in placed
            for t in _tensors(b).values()
        )
        seen.append((prefix, ram, parked))

    model = blockload.load_blockwise(cls, folder, torch.float32, "none", "meta", count, on_group=watch)
    blocks = blocks_of(model)
    assert len(seen) == len(blocks) + 1  # the rest, then one call per block
    for prefix, ram, parked in seen:
        assert ram == parked, (prefix, ram, parked)
    assert seen[-1][2] > 0
    ref = dict(cls.from_pretrained(folder).state_dict())
    for index, block in enumerate(blocks):
        swapped = index >= len(blocks) - count
        prefix = blockload.block_prefixes(model)[index]
        for name, t in block.state_dict().items():
            assert t.is_meta is not swapped, (prefix, name)
            if swapped:
                assert torch.equal(t, ref[prefix + name]), (prefix, name)


def test_every_block_list_is_quantized_and_the_rest_stays_dense(saved):
    import bitsandbytes as bnb

    model = blockload.load_blockwise(
        type(_builders()["flux"]()), saved["flux"], torch.float32, "nf4", "cpu", swap_blocks=1
    )
    for block in blocks_of(model):  # FLUX's single blocks too
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
        assert all(m.weight.bnb_quantized for m in linears)
    for name in ("x_embedder", "context_embedder", "proj_out"):
        assert type(getattr(model, name)) is torch.nn.Linear


@pytest.mark.parametrize("quant", ["none", "nf4", "int8"])
def test_parked_blocks_train_the_same_under_the_swap(tmp_path, quant):
    """Loaded with 2 blocks parked in RAM, then swapped (evicted blocks hold NaN): the same loss and
    LoRA gradient as the same checkpoint loaded with nothing parked and no swap."""
    model, _, cond, uncond, make = _sd3()
    model.save_pretrained(tmp_path / "transformer")
    cls = type(model)
    runs = []
    for count in (0, 2):
        loaded = blockload.load_blockwise(cls, tmp_path / "transformer", torch.float32, quant, "cpu", count)
        torch.manual_seed(1)
        params = lora.add_lora(loaded, LoraConfig(rank=4, alpha=4.0, targets=SD3_TARGETS))
        for p in params:
            p.data.normal_(0, 0.05)
        loaded.enable_gradient_checkpointing()
        if count:
            BlockSwap(loaded, count, "cpu", poison=True)
        runs.append(_step(loaded, params, cond, uncond, make))
    (ref_loss, ref_grads), (loss, grads) = runs
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_a_checkpoint_missing_a_tensor_is_a_one_line_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _builders()["sd3"]()
    model.save_pretrained(tmp_path / "transformer")
    file = tmp_path / "transformer" / blockload.WEIGHTS
    state = load_file(str(file))
    dropped = next(k for k in state if k.startswith("transformer_blocks.1."))
    del state[dropped]
    save_file(state, str(file))
    with pytest.raises(UserError, match="no values for 1 tensors") as err:
        blockload.load_blockwise(type(model), tmp_path / "transformer", torch.float32, "none", "cpu")
    assert "\n" not in str(err.value) and dropped in str(err.value)


def test_too_little_ram_for_the_swapped_blocks_is_refused_before_reading(saved, monkeypatch):
    monkeypatch.setattr(swap, "available_ram_bytes", lambda: 1000)
    calls = []
    with pytest.raises(UserError, match="swap_blocks=2 needs"):
        blockload.load_blockwise(type(_builders()["sd3"]()), saved["sd3"], torch.float32, "none", "cpu", 2,
                                 on_group=lambda *a: calls.append(a))  # fmt: skip
    assert calls == []
    assert blockload.checkpoint_keys(saved["sd3"].parent) is None  # no weights there: from_pretrained path


def test_a_hub_id_is_read_block_by_block_from_its_fetched_transformer_folder(saved, monkeypatch):
    """A hub id (the presets' default) fetches only the transformer's json and safetensors, then
    loads block by block; where the fetch fails, the plain from_pretrained path takes over."""
    import huggingface_hub

    from soar_lite.families.common import transformer_folder

    asked = []

    def fetched(repo_id, allow_patterns):
        asked.append((repo_id, tuple(allow_patterns)))
        return str(saved["sd3"].parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetched)
    assert transformer_folder("org/model") == saved["sd3"]
    assert asked == [("org/model", ("transformer/*.json", "transformer/*.safetensors"))]

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert transformer_folder("org/model") is None
    assert transformer_folder(str(saved["sd3"].parent)) == saved["sd3"]


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_on_a_gpu_parked_blocks_stay_pinned_lower_the_load_peak_and_train_the_same(tmp_path, quant):
    """On CUDA: swapped blocks are parked in pinned RAM (never on the GPU), the load's GPU peak is
    lower than without, and the swapped model gives the loss and LoRA gradient of the unswapped one."""
    model, _, cond, uncond, make = _sd3()
    model.save_pretrained(tmp_path / "transformer")
    cond = {k: v.cuda() for k, v in cond.items()}
    uncond = {k: v.cuda() for k, v in uncond.items()}
    runs, peaks = [], []
    for count in (0, 3):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        folder = tmp_path / "transformer"
        loaded = blockload.load_blockwise(type(model), folder, torch.float32, quant, "cuda", count)
        peaks.append(torch.cuda.max_memory_allocated() - base)
        for block in blocks_of(loaded)[len(blocks_of(loaded)) - count :]:
            assert all(t.device.type == "cpu" and t.is_pinned() for t in _tensors(block).values())
        torch.manual_seed(1)
        params = lora.add_lora(loaded, LoraConfig(rank=4, alpha=4.0, targets=SD3_TARGETS))
        for p in params:
            p.data = p.data.cuda()
            p.data.normal_(0, 0.05)
        loaded.enable_gradient_checkpointing()
        if count:
            BlockSwap(loaded, count, "cuda")
        runs.append(_step(loaded, params, cond, uncond, make, device="cuda"))
        del loaded, params
    assert peaks[1] < peaks[0], peaks
    (ref_loss, ref_grads), (loss, grads) = runs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
