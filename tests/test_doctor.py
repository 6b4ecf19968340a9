"""``soar-lite doctor``: it runs here and exits 0, reports what this CPU can and cannot do, turns a
missing optional package into a WARN naming the feature, and a GPU the torch build has no kernels
for (simulated: torch.cuda patched) into a FAIL with advice and exit code 1."""

from __future__ import annotations

import json
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

from soar_lite import doctor
from soar_lite.cli import main

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what a machine without CUDA reports")
GIB = 2**30


def _by_name(record: dict) -> dict[str, dict]:
    return {check["name"]: check for check in record["checks"]}


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], arch_list: list[str]) -> None:
    """Make torch.cuda report one 32 GiB GPU of ``capability`` and a build for ``arch_list``."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 5090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (31 * GIB, 32 * GIB))
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(total_memory=32 * GIB)
    )


@CPU_ONLY
def test_json_here_exits_0_and_reports_what_this_cpu_can_run(capsys):
    code = main(["doctor", "--json"])
    record = json.loads(capsys.readouterr().out)  # nothing but the record on stdout
    checks = _by_name(record)
    assert code == 0 and record["ok"] is True and record["counts"]["FAIL"] == 0
    expected = [*doctor.PACKAGES, "python", "torch", "cuda", "sdpa", "ram", "soar-lite home", "presets"]
    assert set(expected) <= set(checks), set(expected) - set(checks)
    available = {q: checks[f"quant {q}"]["data"]["available"] for q in doctor.QUANTS}
    assert available == {"none": True, "nf4": True, "int8": True, "torchao-int8": True, "torchao-fp8": False}
    assert checks["quant torchao-fp8"]["status"] == "WARN" and "CUDA" in checks["quant torchao-fp8"]["advice"]
    assert checks["torch"]["data"]["version"] == torch.__version__
    assert checks["cuda"]["data"]["available"] is False
    assert "cpu-tiny" in checks["presets"]["detail"]
    assert checks["sdpa"]["status"] == "OK" and checks["ram"]["data"]["total_gb"] > 0
    assert all(c["advice"] for c in record["checks"] if c["status"] != "OK"), "a WARN/FAIL without advice"


@CPU_ONLY
def test_text_report_is_one_line_per_check_and_a_summary(capsys):
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in lines[:-1])
    assert any(line.startswith("WARN") and "torchao-fp8" in line and "->" in line for line in lines)
    assert lines[-1].startswith("soar-lite doctor: 0 FAIL")


def test_missing_optional_package_warns_naming_its_feature(monkeypatch):
    missing = {"gradio", "bitsandbytes"}
    monkeypatch.setattr(doctor, "find_spec", lambda name: None if name in missing else find_spec(name))
    checks = {c.name: c for c in doctor.package_checks()}
    assert checks["gradio"].status == "WARN" and "soar-lite app" in checks["gradio"].detail
    assert "pip install 'gradio" in checks["gradio"].advice
    assert checks["bitsandbytes"].status == "WARN" and "nf4" in checks["bitsandbytes"].detail
    assert checks["diffusers"].status == "OK"
    quants = {c.name: c for c in doctor.quant_checks("cpu")}
    assert quants["quant nf4"].status == "WARN" and quants["quant nf4"].data["available"] is False
    assert quants["quant torchao-int8"].data["available"] is True


def test_missing_required_package_fails(monkeypatch):
    monkeypatch.setattr(doctor, "find_spec", lambda name: None if name == "peft" else find_spec(name))
    checks = {c.name: c for c in doctor.package_checks()}
    assert checks["peft"].status == "FAIL" and "pip install 'peft" in checks["peft"].advice


@pytest.mark.parametrize(
    ("capability", "arch_list", "expected"),
    [
        ((8, 9), ["sm_80", "sm_86", "sm_90"], "native"),  # sm_86 code runs on sm_89 (same major)
        ((8, 0), ["sm_86", "sm_90"], ""),  # but not backwards
        ((12, 0), ["sm_50", "sm_80", "sm_86", "sm_90"], ""),  # RTX 50xx on a pre-Blackwell build
        ((12, 0), ["sm_90", "sm_100", "sm_120"], "native"),
        ((12, 0), ["sm_90", "compute_90"], "ptx"),  # only the JIT fallback
        ((9, 0), ["sm_90a"], "native"),
        ((9, 1), ["sm_90a"], ""),  # an arch-specific 'a' build runs only on that exact GPU
    ],
)
def test_arch_support(capability, arch_list, expected):
    assert doctor.arch_support(capability, arch_list) == expected


def test_gpu_missing_from_the_torch_build_fails_with_advice(monkeypatch):
    _fake_gpu(monkeypatch, (12, 0), ["sm_50", "sm_80", "sm_86", "sm_90"])
    checks = {c.name: c for c in doctor.gpu_checks(doctor.gpus())}
    kernels = checks["gpu0 kernels"]
    assert kernels.status == "FAIL" and "sm_120" in kernels.detail
    assert "torch" in kernels.advice and "cu128" in kernels.advice
    assert checks["gpu0"].status == "OK" and "32.0 GiB total" in checks["gpu0"].detail


def test_supported_gpu_passes_and_busy_vram_warns(monkeypatch):
    _fake_gpu(monkeypatch, (8, 9), ["sm_80", "sm_86", "sm_90"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (20 * GIB, 32 * GIB))
    checks = {c.name: c for c in doctor.gpu_checks(doctor.gpus())}
    assert checks["gpu0 kernels"].status == "OK"
    assert checks["gpu0"].status == "WARN" and "nvidia-smi" in checks["gpu0"].advice


def test_simulated_unsupported_gpu_exits_1_without_a_traceback(monkeypatch, capsys):
    _fake_gpu(monkeypatch, (12, 0), ["sm_50", "sm_80", "sm_86", "sm_90"])
    code = main(["doctor", "--json"])
    record = json.loads(capsys.readouterr().out)
    checks = _by_name(record)
    assert code == 1 and record["ok"] is False
    assert checks["gpu0 kernels"]["status"] == "FAIL" and checks["gpu0 kernels"]["advice"]
    # no real CUDA behind the fake: bitsandbytes' forward on cuda:0 fails and is reported, not raised
    assert checks["quant nf4"]["status"] == "FAIL" and "cuda:0" in checks["quant nf4"]["detail"]


def test_any_fail_means_exit_1(monkeypatch, capsys):
    fail = doctor.Check("sdpa", doctor.FAIL, "broken", "reinstall torch")
    monkeypatch.setattr(doctor, "run_checks", lambda: [doctor.Check("python", doctor.OK, "3.x"), fail])
    assert doctor.doctor() == 1
    assert "FAIL  sdpa" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "run_checks", lambda: [doctor.Check("ram", doctor.WARN, "low", "free some")])
    assert doctor.doctor(as_json=True) == 0


def test_nvidia_gpu_with_cpu_only_torch_fails_with_reinstall_advice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(doctor, "_nvidia_present", lambda: True)
    check = doctor.cuda_check()
    assert check.status == "FAIL" and "CPU-only" in check.detail and "--index-url" in check.advice


def test_unusable_home_fails(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SOAR_LITE_HOME", str(blocker / "home"))
    home = doctor.disk_checks()[0]
    assert home.name == "soar-lite home" and home.status == "FAIL" and "SOAR_LITE_HOME" in home.advice


def test_presets_that_fit_a_12gb_card(monkeypatch):
    gpu = [{"index": 0, "name": "RTX 3060", "capability": [8, 6], "total_gb": 11.8, "free_gb": 11.0}]
    ready = [doctor.Check(f"quant {q}", doctor.OK, "", data={"available": True}) for q in doctor.QUANTS]
    check = doctor.preset_check(gpu, ready)
    assert check.status == "OK" and check.data["suggested"] == "12gb"
    assert check.data["suggested_by_family"] == {"sd3": "12gb", "flux": "flux-12gb"}  # the planner: 8.2 GiB
    assert "--preset 12gb (SD3.5) or --preset flux-12gb (FLUX.1)" in check.detail
    assert "48gb" in " ".join(check.data["does_not_fit"]) and "8gb" in check.data["fits"]
    no_bnb = [c if c.name not in ("quant nf4", "quant int8") else doctor.Check(c.name, doctor.FAIL, "",
              data={"available": False}) for c in ready]  # fmt: skip
    check = doctor.preset_check(gpu, no_bnb)
    assert "8gb" not in check.data["fits"] and "needs quant=nf4" in " ".join(check.data["does_not_fit"])


def test_cache_line_reports_size_and_what_prune_frees(tmp_path, monkeypatch):
    from soar_lite import doctor as doc
    from tests.test_cache import _age, cache_once, fake_data, fake_model

    root = tmp_path / "cache"
    assert doc.cache_check(root).detail.startswith("empty")
    manifest = cache_once(fake_data(tmp_path / "d", 3), fake_model(tmp_path / "m"), root).manifest
    ok = doc.cache_check(root)
    assert ok.status == doc.OK and ok.data["bytes"] > 0 and "in 1 datasets" in ok.detail
    from soar_lite.cache import STORE_NAME

    _age([manifest, *(root / STORE_NAME / "shards").glob("*.safetensors")], days=40)
    monkeypatch.setattr(doc, "GIB", 1)  # any prunable byte is "a lot" for this tiny store
    warn = doc.cache_check(root)
    assert warn.status == doc.WARN and "soar-lite cache --prune frees" in warn.advice
