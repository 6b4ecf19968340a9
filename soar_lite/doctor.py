"""``soar-lite doctor``: one command that says what is wrong with this machine, and what to do.

The installs that break LoRA trainers fail in the same few ways: a torch build without kernels for a
new GPU (sm_120), bitsandbytes whose CUDA setup fails although torch sees the GPU, a driver older
than torch's CUDA, a missing package, too little RAM or disk. Each check here is cheap (no model
download, no network, milliseconds of GPU work) and gives one line: OK, WARN (works, with a limit
worth knowing) or FAIL (something installed or needed is broken), with what to do for WARN/FAIL.
Exit code 1 when any check FAILs, so scripts and CI can gate on it; ``--json`` for machines.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from soar_lite.errors import UserError

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GIB = 2**30
QUANTS = ("none", "nf4", "int8", "torchao-int8", "torchao-fp8")
QUANT_PACKAGE = {
    "nf4": "bitsandbytes",
    "int8": "bitsandbytes",
    "torchao-int8": "torchao",
    "torchao-fp8": "torchao",
}
# Package -> the feature it enables (None: soar-lite cannot run without it).
PACKAGES: dict[str, str | None] = {
    "diffusers": None,
    "peft": None,
    "accelerate": None,
    "transformers": None,
    "safetensors": None,
    "bitsandbytes": "quant=nf4|int8 and optimizer=adamw8bit",
    "torchao": "quant=torchao-int8|torchao-fp8",
    "gradio": "`soar-lite app`",
}
MIN_RAM_GB = 16  # T5-XXL (~9.5 GB in 16-bit) loads into RAM to cache SD3.5 / FLUX.1 text embeddings
MIN_HOME_GB = 5  # latent + text-embedding caches: ~3 MB per image at 1024 px with T5 embeddings
MIN_HF_CACHE_GB = 30  # first SD3.5-Large download with its text encoders is ~28 GB (Medium ~16 GB)
TORCH_INDEX = "https://download.pytorch.org/whl"


@dataclass
class Check:
    """One line of the report; ``data`` is the machine-readable part of ``--json``."""

    name: str
    status: str
    detail: str
    advice: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        line = f"{self.status:4s}  {self.name:18s} {self.detail}"
        return f"{line}  -> {self.advice}" if self.advice else line


def _oneline(exc: BaseException) -> str:
    """An exception as one short line: its type and the start of its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow import-time chatter (bitsandbytes, torchao) so that ``--json`` stays parseable."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def _requirements() -> dict[str, str]:
    """soar-lite's declared version ranges by package (empty when it is not installed as a package)."""
    try:
        from importlib.metadata import PackageNotFoundError, requires

        from packaging.requirements import Requirement

        found = [Requirement(text) for text in requires("soar-lite") or []]
    except (ImportError, PackageNotFoundError, ValueError):
        return {}
    return {req.name.lower(): str(req.specifier) for req in found}


def _in_range(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies ``spec`` (local tags like ``+cpu`` ignored; True if unknown)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return not spec or Version(version.split("+")[0]) in SpecifierSet(spec)
    except (ImportError, ValueError):
        return True


def python_check() -> Check:
    """The interpreter in use (pip refuses soar-lite below 3.10): which one matters in bug reports."""
    version = platform.python_version()
    detail = f"{version} ({platform.system()} {platform.machine()}, {sys.executable})"
    return Check("python", OK, detail, data={"version": version, "executable": sys.executable})


def torch_check() -> Check:
    """The torch version and the CUDA it was built with (a ``+cpu`` build never sees a GPU)."""
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    detail = f"{torch.__version__} ({build})"
    data = {"version": torch.__version__, "cuda_build": torch.version.cuda}
    spec = _requirements().get("torch", "")
    if _in_range(torch.__version__, spec):
        return Check("torch", OK, detail, data=data)
    advice = f"pip install 'torch{spec}' from the CUDA index your GPU needs (pytorch.org/get-started)"
    return Check("torch", WARN, f"{detail}, outside soar-lite's range {spec}", advice, data)


def _nvidia_present() -> bool:
    """An NVIDIA driver is loaded (Linux), whether or not torch can use it."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def _driver() -> str:
    """The driver version and the newest CUDA it runs, as far as this platform tells."""
    parts = []
    with contextlib.suppress(OSError):
        text = Path("/proc/driver/nvidia/version").read_text()
        if found := re.search(r"Kernel Module\s+([\d.]+)", text):
            parts.append(f"driver {found.group(1)}")
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    with contextlib.suppress(Exception):
        if getter is not None and (version := getter()):
            parts.append(f"driver runs CUDA <= {version // 1000}.{version % 1000 // 10}")
    return ", ".join(parts)


def cuda_check() -> Check:
    """Can torch use a GPU? If not and one is there, the reason torch gave (driver, build, env)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    driver, count = _driver(), torch.cuda.device_count() if available else 0
    data = {"available": available, "device_count": count, "driver": driver}
    if available:
        detail = f"{count} GPU(s), CUDA {torch.version.cuda} build" + (f"; {driver}" if driver else "")
        return Check("cuda", OK, detail, data=data)
    reason = " ".join(str(caught[-1].message).split())[:200] if caught else ""
    if not _nvidia_present():
        advice = "fine for the cpu-tiny preset; the SD3.5 and FLUX.1 presets need an NVIDIA GPU"
        return Check("cuda", WARN, "no NVIDIA GPU found: training runs on the CPU", advice, data)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        advice = "unset CUDA_VISIBLE_DEVICES (or list the GPUs to use) unless the CPU is meant"
        return Check("cuda", WARN, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU", advice, data)
    if torch.version.cuda is None:
        return Check(
            "cuda",
            FAIL,
            f"an NVIDIA GPU is here but torch {torch.__version__} is a CPU-only build",
            f"reinstall torch from a CUDA index, e.g. pip install --force-reinstall torch "
            f"--index-url {TORCH_INDEX}/cu128 (pick the CUDA your driver runs)",
            data,
        )
    return Check(
        "cuda",
        FAIL,
        f"an NVIDIA GPU is here but torch cannot use it ({driver}) {reason}".strip(),
        f"a driver older than torch's CUDA {torch.version.cuda} is the usual cause: update the "
        "driver (nvidia-smi must work) or install a torch built for an older CUDA",
        data,
    )


def gpus() -> list[dict[str, Any]]:
    """Name, compute capability and VRAM of every visible GPU (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        found.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "capability": [major, minor],
                "total_gb": total / GIB,
                "free_gb": free / GIB,
            }
        )
    return found


def arch_support(capability: tuple[int, int], arch_list: list[str]) -> str:
    """How a torch build runs on a GPU: ``"native"`` (machine code for it: ``sm_XY`` runs on the
    same major with minor >= Y, an ``a`` build only on exactly XY), ``"ptx"`` (only a ``compute_XY``
    fallback the driver must JIT-compile: slow first steps, some kernels missing) or ``""`` (none)."""
    device = capability[0] * 10 + capability[1]
    ptx = False
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        code = number.rstrip("af")
        if not code.isdigit():
            continue
        cc = int(code)
        same_family = not number.endswith("a") and cc // 10 == device // 10 and cc <= device
        if kind == "sm" and (cc == device or same_family):
            return "native"
        ptx = ptx or (kind == "compute" and cc <= device)
    return "ptx" if ptx else ""


def gpu_checks(found: list[dict[str, Any]]) -> list[Check]:
    """One line per GPU: VRAM (others' use of it), and whether this torch build has kernels for it."""
    arch_list = list(torch.cuda.get_arch_list()) if found else []
    checks = []
    for gpu in found:
        major, minor = gpu["capability"]
        sm, name = f"sm_{major}{minor}", f"gpu{gpu['index']}"
        detail = f"{gpu['name']}, {sm}, {gpu['total_gb']:.1f} GiB total, {gpu['free_gb']:.1f} GiB free"
        busy = gpu["free_gb"] < gpu["total_gb"] - 1.5  # our own CUDA context takes ~0.5 GiB
        advice = "other processes hold GPU memory (see nvidia-smi): close them before training"
        checks.append(Check(name, WARN, detail, advice, gpu) if busy else Check(name, OK, detail, data=gpu))
        support = arch_support((major, minor), arch_list)
        data = {"capability": sm, "arch_list": arch_list, "support": support or "none"}
        status, detail, advice = {
            "native": (OK, f"torch has {sm}-compatible kernels", ""),
            "ptx": (WARN, f"torch has no {sm} code, only a PTX fallback (JIT-compiled: slow first steps)",
                    _kernel_advice(major * 10 + minor, arch_list)),
            "": (FAIL, f"torch {torch.__version__} has no kernels for {sm} (built for "
                 f"{' '.join(arch_list) or 'no GPU'})", _kernel_advice(major * 10 + minor, arch_list)),
        }[support]  # fmt: skip
        checks.append(Check(f"{name} kernels", status, detail, advice, data))
    return checks


def _kernel_advice(device: int, arch_list: list[str]) -> str:
    """What to install when the torch build lacks this GPU: newer for new GPUs, older for old ones."""
    built = [int(a.split("_")[1].rstrip("af")) for a in arch_list if a.split("_")[1].rstrip("af").isdigit()]
    if built and device < min(built):
        return (
            f"this GPU (sm_{device}) is older than every architecture in this torch build: install "
            "a torch built for an older CUDA (pytorch.org/get-started/previous-versions) or use a "
            "newer GPU"
        )
    return (
        f"install a torch built for sm_{device}: pip install --upgrade 'torch<2.14' --index-url "
        f"{TORCH_INDEX}/cu128 (RTX 50xx / sm_120 and B200 / sm_100 need CUDA >= 12.8 builds, "
        "torch >= 2.7), then bitsandbytes >= 0.45 and rerun soar-lite doctor"
    )


def package_checks() -> list[Check]:
    """Each package's version; missing required = FAIL, missing optional = WARN naming the feature."""
    ranges = _requirements()
    checks = []
    for package, feature in PACKAGES.items():
        spec = ranges.get(package, "")
        wanted = f"'{package}{spec}'"
        if find_spec(package) is None:
            if feature is None:
                checks.append(Check(package, FAIL, "not installed (required)", f"pip install {wanted}"))
            else:
                checks.append(Check(package, WARN, f"not installed: no {feature}", f"pip install {wanted}"))
            continue
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(package)
        except Exception:
            version = "unknown"
        data = {"version": version, "range": spec}
        if version == "unknown" or _in_range(version, spec):
            checks.append(Check(package, OK, version, data=data))
        else:
            checks.append(
                Check(
                    package,
                    WARN,
                    f"{version}, outside soar-lite's range {spec}",
                    f"pip install {wanted}",
                    data,
                )
            )
    return checks


def backend_smoke(quant: str, device: torch.device) -> str:
    """A 64x64 linear of backend ``quant`` run forward on ``device`` against the dense result: what
    catches bitsandbytes' "CUDA Setup failed", kernel-less builds and torch/torchao mismatches that
    an import alone misses. Milliseconds. Returns the error, or '' when it works."""
    if quant == "none":
        return ""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 64, generator=gen), torch.randn(4, 64, generator=gen)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the presets' dtypes
    try:
        with _quiet():
            layer = _quantized_linear(quant, weight.to(dtype), device)
            out = layer(x.to(device, dtype)).float().cpu()
    except Exception as exc:  # any failure of the library is the finding, not a crash of the doctor
        return _oneline(exc)
    error = ((out - x @ weight.T).norm() / (x @ weight.T).norm()).item()
    return "" if error < 0.25 else f"wrong results (relative error {error:.2f})"


def _quantized_linear(quant: str, weight: torch.Tensor, device: torch.device) -> torch.nn.Module:
    """``weight`` as a quantized linear on ``device``, the way ``soar_lite.quant`` builds them."""
    if quant in ("nf4", "int8"):
        import bitsandbytes as bnb

        if quant == "nf4":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=weight.dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return layer.to(device)  # bitsandbytes quantizes here
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 64, bias=False, device=device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    quantize_(layer, Int8WeightOnlyConfig() if quant == "torchao-int8" else Float8WeightOnlyConfig())
    return layer


def quant_checks(device: torch.device | str) -> list[Check]:
    """Which ``model.quant`` backends run on ``device``: the hardware rule of ``quant.check_backend``,
    the library installed, and a real forward of a tiny layer. Hardware limits WARN, broken libraries
    FAIL (an installed but broken library bites whoever picks that preset)."""
    from soar_lite.quant import check_backend

    device = torch.device(device)
    checks = []
    for quant in QUANTS:
        name, package = f"quant {quant}", QUANT_PACKAGE.get(quant)
        try:
            check_backend(quant, device)
        except UserError as exc:
            checks.append(Check(name, WARN, f"not available on {device}", str(exc), {"available": False}))
            continue
        if package is not None and find_spec(package) is None:
            missing = f"not available: {package} is not installed"
            checks.append(Check(name, WARN, missing, f"pip install {package}", {"available": False}))
            continue
        error = backend_smoke(quant, device)
        proof = " (tiny quantized forward checked)" if package else ""
        if error:
            advice = (f"pip install --upgrade {package} (it needs a build for this GPU and CUDA); "
                      "meanwhile use quant=none or another backend marked OK")  # fmt: skip
            data = {"available": False, "error": error}
            checks.append(
                Check(name, FAIL, f"{package} failed a tiny {quant} layer on {device}: {error}", advice, data)
            )
        else:
            checks.append(Check(name, OK, f"runs on {device}{proof}", data={"available": True}))
    return checks


def sdpa_check(device: torch.device | str) -> Check:
    """torch's own fused attention (SDPA) runs: soar-lite needs no xformers / flash-attn packages."""
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        q = torch.randn(1, 2, 8, 16, device=device, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except Exception as exc:
        error = f"scaled_dot_product_attention failed on {device}: {_oneline(exc)}"
        return Check("sdpa", FAIL, error, "reinstall a torch built for this GPU", {"available": False})
    return Check("sdpa", OK, f"torch scaled_dot_product_attention runs on {device}", data={"available": True})


def system_memory() -> tuple[float, float] | None:
    """(total, available) system RAM in GiB: /proc/meminfo, else psutil if installed, else sysconf."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        fields = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
        )
        kib = {key: int(fields[key].split()[0]) for key in ("MemTotal", "MemAvailable")}
        return kib["MemTotal"] / 2**20, kib["MemAvailable"] / 2**20
    if find_spec("psutil") is not None:
        import psutil

        info = psutil.virtual_memory()
        return info.total / GIB, info.available / GIB
    with contextlib.suppress(AttributeError, ValueError, OSError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return total, total
    return None


def ram_check() -> Check:
    """System RAM: caching SD3.5 text embeddings loads T5-XXL into RAM first (USER-PAINS: RAM, not
    VRAM, is often the real limit)."""
    memory = system_memory()
    advice = (f"caching SD3.5 text embeddings loads T5-XXL (~9.5 GB) into RAM: have {MIN_RAM_GB} GiB "
              "free for `soar-lite cache` (training from the cache does not load it)")  # fmt: skip
    if memory is None:
        return Check("ram", WARN, "could not read system memory on this platform", advice)
    total, available = memory
    detail = f"{total:.1f} GiB total, {available:.1f} GiB available"
    data = {"total_gb": total, "available_gb": available}
    return (
        Check("ram", WARN, detail, advice, data)
        if available < MIN_RAM_GB
        else Check("ram", OK, detail, data=data)
    )


def _disk(name: str, path: Path, min_gb: float, why: str) -> Check:
    """Free space where ``path`` lives (its nearest existing folder) and whether it can be written."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free / GIB
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as exc:
        advice = f"fix the folder's permissions or point {why} elsewhere"
        return Check(name, FAIL, f"{path} is not writable ({exc.strerror})", advice, {"path": str(path)})
    data = {"path": str(path), "free_gb": free, "writable": True}
    detail = f"{free:.1f} GiB free at {path}, writable"
    if free < min_gb:
        return Check(name, WARN, detail, f"free at least {min_gb} GiB there, or point {why} elsewhere", data)
    return Check(name, OK, detail, data=data)


def cache_check(root: Path) -> Check:
    """The shared latent/embedding cache: its size and what ``soar-lite cache --prune`` would free
    (it only grows: every dataset and setting adds tensors)."""
    from soar_lite import cache

    if not (root / cache.STORE_NAME).is_dir():
        return Check("cache", OK, f"empty ({root})", data={"path": str(root), "bytes": 0})
    use = cache.usage(root)
    data = {"path": str(root), "bytes": use.shard_bytes, "prunable_bytes": use.prunable_bytes}
    detail = f"{use.shard_bytes / GIB:.2f} GiB in {use.manifests} datasets at {root}"
    if use.prunable_bytes > 1 * GIB:
        advice = (
            f"soar-lite cache --prune frees ~{use.prunable_bytes / GIB:.1f} GiB (datasets unused for 30 days)"
        )
        return Check("cache", WARN, detail, advice, data)
    return Check("cache", OK, detail, data=data)


def disk_checks() -> list[Check]:
    """The soar-lite home (tiny base, caches) and the Hugging Face cache (model downloads)."""
    from soar_lite.paths import home_dir

    try:
        home = home_dir()
    except OSError as exc:
        error = f"cannot create {exc.filename} ({exc.strerror})"
        return [Check("soar-lite home", FAIL, error, "set SOAR_LITE_HOME to a writable folder")]
    checks = [_disk("soar-lite home", home, MIN_HOME_GB, "SOAR_LITE_HOME / data.cache_dir")]
    from soar_lite.cache import cache_root

    checks.append(cache_check(cache_root("")))
    with contextlib.suppress(ImportError):
        from huggingface_hub.constants import HF_HUB_CACHE

        checks.append(_disk("hf cache", Path(HF_HUB_CACHE), MIN_HF_CACHE_GB, "HF_HOME"))
    return checks


def preset_check(found: list[dict[str, Any]], quants: list[Check]) -> Check:
    """Which shipped presets fit this GPU: the memory planner's estimate against its total VRAM, and
    the preset's quantization available here."""
    if not found:
        detail = "no CUDA GPU: only the cpu-tiny preset trains at useful speed"
        return Check("presets", WARN, detail, "the GPU presets need an NVIDIA GPU", {"fits": ["cpu-tiny"]})
    from soar_lite import config
    from soar_lite.plan import plan, preset_family, tier_of

    vram = found[0]["total_gb"]
    runs = {c.name.removeprefix("quant "): c.data.get("available", False) for c in quants}
    fits, misses = [], []
    for name in config.preset_names():
        cfg = config.load_config(name, [])
        if cfg.model.path == config.BUILTIN:
            continue
        estimate = plan(cfg, cfg.model.path, vram)
        blocked = [q for q in _needs(cfg.model.quant, cfg.optim.optimizer) if not runs.get(q, False)]
        if blocked:
            misses.append(f"{name} (needs quant={blocked[0]}: not available)")
        elif estimate.fits:
            fits.append((name, estimate.total))
        else:
            misses.append(f"{name} ({estimate.total:.1f} GiB est.)")
    data = {"vram_gb": vram, "fits": [n for n, _ in fits], "does_not_fit": misses}
    if not fits:
        advice = f"plan your own settings: soar-lite plan --preset 8gb quant=... (card: {vram:.1f} GiB)"
        return Check("presets", WARN, f"no GPU preset fits {vram:.1f} GiB: {', '.join(misses)}", advice, data)
    suggested: dict[str, str] = {}  # per family (SD3.5, FLUX.1): the largest tier that fits this card
    for family in ("sd3", "flux"):
        mine = [n for n, _ in fits if preset_family(n) == family]
        tiered = [n for n in mine if (tier_of(n) or 0) <= vram / 0.95]
        if mine:
            suggested[family] = max(tiered, key=lambda n: tier_of(n) or 0) if tiered else mine[0]
    best = suggested.get("sd3") or next(iter(suggested.values()))
    detail = f"fit {vram:.1f} GiB: {', '.join(f'{n} ({gb:.1f} GiB est.)' for n, gb in fits)}"
    detail += f"; too big or unavailable: {', '.join(misses)}" if misses else ""
    labels = {"sd3": "SD3.5", "flux": "FLUX.1"}
    start = " or ".join(f"--preset {name} ({labels[family]})" for family, name in suggested.items())
    data = {**data, "suggested": best, "suggested_by_family": suggested}
    return Check("presets", OK, f"{detail}; start with {start}", data=data)


def _needs(quant: str, optimizer: str) -> list[str]:
    """The quant backends a preset needs (adamw8bit needs bitsandbytes: the nf4 check runs it)."""
    return [quant] + (["nf4"] if optimizer == "adamw8bit" else [])


def _guarded(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run one check; a check that crashes becomes a FAIL line, never a traceback of the doctor."""
    try:
        result = fn()
    except Exception as exc:
        error = f"the check itself failed: {_oneline(exc)}"
        return [Check(name, FAIL, error, "report this with the output of soar-lite doctor --json")]
    return result if isinstance(result, list) else [result]


def run_checks() -> list[Check]:
    """Every check, in the order a user would fix them (install, GPU, libraries, resources, fit)."""
    checks = _guarded("python", python_check) + _guarded("torch", torch_check)
    checks += _guarded("cuda", cuda_check)
    try:
        with warnings.catch_warnings():  # torch's own sm warning: the kernels line says it in one line
            warnings.simplefilter("ignore")
            found = gpus()
    except Exception as exc:  # torch sees a GPU but cannot open it: say so instead of skipping it
        found, error = [], f"torch cannot query the GPU: {_oneline(exc)}"
        checks.append(Check("gpu", FAIL, error, "check nvidia-smi; reboot after a driver update"))
    checks += _guarded("gpu", lambda: gpu_checks(found))
    device = torch.device("cuda", 0) if found else torch.device("cpu")
    checks += _guarded("packages", package_checks)
    quants = _guarded("quant", lambda: quant_checks(device))
    checks += quants + _guarded("sdpa", lambda: sdpa_check(device))
    checks += _guarded("ram", ram_check) + _guarded("disk", disk_checks)
    checks += _guarded("presets", lambda: preset_check(found, quants))
    return checks


def doctor(as_json: bool = False) -> int:
    """Print the report (text or ``--json``); 1 when any check FAILs, else 0."""
    checks = run_checks()
    counts = {status: sum(c.status == status for c in checks) for status in (OK, WARN, FAIL)}
    if as_json:
        record = {"ok": counts[FAIL] == 0, "counts": counts, "checks": [asdict(c) for c in checks]}
        print(json.dumps(record, indent=2))
    else:
        for check in checks:
            print(check.render())
        print(f"soar-lite doctor: {counts[FAIL]} FAIL, {counts[WARN]} WARN, {counts[OK]} OK")
    return 1 if counts[FAIL] else 0
