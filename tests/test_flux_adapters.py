"""LoKr / LoHa on FLUX.1: the file's factors, read with ComfyUI's formulas, give peft's merged weights.

ComfyUI maps ``transformer.<diffusers module>`` keys for FLUX through its ``flux_to_diffusers`` table
(q/k/v as row slices of the fused BFL weights) and applies each LyCORIS module's update to its slice;
the formula side is ``tests.test_adapters.comfy_delta`` (written from ComfyUI's published formulas).
"""

from __future__ import annotations

import pytest
import torch

from soar_lite import families
from soar_lite.config import LoraConfig
from soar_lite.lora import add_lora, folded_state
from tests.test_adapters import CASES, by_module, comfy_delta, peft_merged

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_flux_lycoris_file_fuses_to_peft_merged_weights(case):
    from soar_lite.toy.tiny_flux import tiny_flux_transformer

    model = tiny_flux_transformer(0)
    model.requires_grad_(False)
    cfg = LoraConfig(**case, targets=list(families.family_class("flux").default_lora_targets))
    params = add_lora(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    merged = peft_merged(model)
    modules = by_module(folded_state(model, cfg))
    assert modules.keys() == merged.keys()
    assert any(m.startswith("single_transformer_blocks.") for m in modules) and len(modules) >= 15
    for module, factors in modules.items():
        base = model.get_submodule(module).get_base_layer().weight.detach()
        fused = base + comfy_delta(factors).reshape(base.shape)
        torch.testing.assert_close(fused, merged[module], rtol=1e-5, atol=1e-6, msg=module)


def test_lycoris_on_an_nf4_base_is_refused_in_one_line():
    """peft's LoKr/LoHa reshape the base weight, which bnb keeps packed (measured: a crash at step 1)."""
    from soar_lite import config

    for kind in ("lokr", "loha"):
        with pytest.raises(config.UserError, match="cannot train on an NF4 base"):
            config.load_config("flux-16gb", [f"lora.type={kind}"])
        assert config.load_config("flux-24gb", [f"lora.type={kind}"]).model.quant == "int8"  # int8 trains
