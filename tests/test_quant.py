"""Quantized frozen bases: every backend that can run here trains and lowers the loss; the others
fail with a clear error before any long work; GPU-only paths are marked and skip cleanly."""

from __future__ import annotations

import pytest
import torch

from soar_lite.config import LoraConfig, SoarConfig
from soar_lite.errors import UserError
from soar_lite.families.sd3 import SD3Family
from soar_lite.lora import add_lora
from soar_lite.objective import soar_loss
from soar_lite.quant import check_backend

CPU_BACKENDS = ["torchao-int8", "nf4", "int8"]


def _quantized_layers(model: torch.nn.Module, quant: str) -> int:
    import bitsandbytes as bnb

    kind = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}.get(quant)
    if kind is not None:
        return sum(isinstance(m, kind) for m in model.modules())
    return sum(
        "AffineQuantized" in type(m.weight).__name__ or "Int8" in type(m.weight).__name__
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )


@pytest.mark.parametrize("quant", CPU_BACKENDS)
def test_quantized_base_trains_a_lora_and_lowers_the_loss(tiny_model_dir, quant):
    family = SD3Family.load(str(tiny_model_dir), quant=quant, text_encoders=False, vae=False)
    model = family.transformer
    assert _quantized_layers(model, quant) >= 10, "the base was not quantized"
    torch.manual_seed(0)
    params = add_lora(model, LoraConfig(rank=4, alpha=4.0))
    opt = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 16, 16, 16, generator=g)
    cond = {
        "prompt_embeds": torch.randn(4, 14, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(4, 64, generator=g),
    }
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    cfg = SoarConfig(trajectory_length=1)
    velocity, grid = family.velocity(model), family.noise_grid()

    def loss() -> float:
        report = soar_loss(
            velocity,
            z0,
            cond,
            uncond,
            grid,
            cfg,
            generator=torch.Generator().manual_seed(1),
            backward=lambda term, last: term.backward(),
        )
        return float(report.loss)

    first = loss()
    opt.zero_grad()
    for _ in range(15):
        loss()
        opt.step()
        opt.zero_grad()
    assert loss() < 0.95 * first


def test_backend_that_cannot_run_here_is_a_clear_error_naming_the_alternatives():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(
        UserError, match=r"quant=torchao-fp8 needs a CUDA GPU .* use one of: none, torchao-int8"
    ):
        check_backend("torchao-fp8", "cpu")


@pytest.mark.slow
def test_quantized_run_end_to_end(tiny_model_dir, tiny_data_dir, tmp_path):
    from soar_lite import config, train
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(
        **{"model.path": tiny_model_dir, "data.path": tiny_data_dir, "quant": "nf4", "steps": 2}
    )
    out = train.train(config.load_config("cpu-tiny", overrides), tmp_path / "q", progress=False)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", "int8", "torchao-fp8"])
def test_gpu_quantization_loads_through_diffusers(tiny_model_dir, quant):
    family = SD3Family.load(
        str(tiny_model_dir), device="cuda", dtype="bfloat16", quant=quant, text_encoders=False, vae=False
    )
    assert _quantized_layers(family.transformer, quant) >= 10 or quant == "torchao-fp8"


def test_cuda_bnb_config_quantizes_what_the_cpu_path_quantizes():
    """The CPU-tested layout is the CUDA one: the same layers stay dense, the same int8 threshold."""
    import bitsandbytes as bnb

    from soar_lite import quant
    from soar_lite.toy.tiny_sd3 import tiny_sd3_transformer

    model = tiny_sd3_transformer(0)
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    quant.quantize_bnb_linears(model, "int8", torch.float32)
    swapped = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    dense = {n for n in linears if n.split(".")[0] in quant.KEEP_DENSE}
    assert swapped == linears - dense and dense  # every linear outside KEEP_DENSE, none inside
    assert all(
        m.state.threshold == quant.INT8_THRESHOLD
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear8bitLt)
    )
    for name in ("nf4", "int8"):
        config = quant.diffusers_config(name, torch.bfloat16, "cuda")  # built without a GPU
        assert config.llm_int8_skip_modules == list(quant.KEEP_DENSE)
    assert quant.diffusers_config("int8", torch.bfloat16, "cuda").llm_int8_threshold == quant.INT8_THRESHOLD
