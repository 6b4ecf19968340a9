"""Text-encoder placement for the cache stage: the rule, the hooks, and unchanged embeddings."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from soar_lite import offload
from soar_lite.config import DataConfig
from soar_lite.errors import UserError
from soar_lite.families.sd3 import SD3Family

GB = 2**30
SD35_BF16 = [int(0.25e9), int(1.39e9), int(9.52e9)]  # CLIP-L, CLIP-G, T5-XXL encoder


@pytest.mark.parametrize(
    ("card_gb", "expected"), [(8, "sequential"), (12, "model"), (16, "none"), (24, "none"), (None, "none")]
)
def test_sd35_encoders_are_offloaded_on_small_cards(card_gb, expected):
    budget = None if card_gb is None else card_gb * GB
    assert offload.choose(SD35_BF16, budget) == expected


def test_module_bytes_counts_parameters_and_buffers():
    norm = torch.nn.BatchNorm1d(10)  # 20 params + 21 buffer values (running mean/var, count)
    assert offload.module_bytes(norm) == 20 * 4 + 20 * 4 + 8


class _Spy(torch.nn.Linear):
    """Records where it is asked to go and stays put (so a 'cuda' target works on a CPU machine)."""

    moves: ClassVar[list[tuple[str, str]]] = []

    def to(self, *args, **kwargs):
        _Spy.moves.append((self.tag, str(args[0])))
        return self


def test_one_resident_moves_only_the_encoder_about_to_run():
    a, b = _Spy(3, 3), _Spy(3, 3)
    a.tag, b.tag = "a", "b"
    resident = offload.OneResident([a, b], torch.device("cuda"))
    assert _Spy.moves == [("a", "cpu"), ("b", "cpu")]  # both start in system RAM
    _Spy.moves.clear()
    x = torch.ones(1, 3)
    a(x), a(x), b(x), a(x)
    assert _Spy.moves == [("a", "cuda"), ("a", "cpu"), ("b", "cuda"), ("b", "cpu"), ("a", "cuda")]
    resident.remove()
    _Spy.moves.clear()
    b(x)
    assert _Spy.moves == []


def test_embeddings_do_not_depend_on_the_offload_mode(tiny_model_dir):
    prompts = ["a red circle", "a small blue square on green"]
    out = {}
    for mode in ("none", "model", "sequential", "auto"):
        family = SD3Family.load(str(tiny_model_dir), transformer=False, vae=False, encoder_offload=mode)
        out[mode] = family.encode_prompts(prompts)
        family.free_encoders()
    for mode in ("model", "sequential", "auto"):
        for key in out["none"]:
            torch.testing.assert_close(out[mode][key], out["none"][key], rtol=0, atol=0)


def test_unknown_offload_mode_is_a_one_line_error():
    with pytest.raises(UserError, match="encoder_offload"):
        DataConfig(encoder_offload="gpu")


def test_freed_encoders_are_gone_at_once_even_with_offload_hooks(tiny_model_dir):
    """A hook and its module hold each other; free_encoders must not leave the last one resident."""
    import gc
    import weakref

    family = SD3Family.load(str(tiny_model_dir), transformer=False, vae=False, encoder_offload="model")
    family.encode_prompts(["a red circle"])
    refs = [weakref.ref(m) for m in (family.pipe.text_encoder, family.pipe.text_encoder_2)]
    gc.disable()  # only free_encoders' own collection may free them
    try:
        family.free_encoders()
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
