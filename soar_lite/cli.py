"""``soar-lite``: one table from subcommand to function; user errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from soar_lite import config
from soar_lite.errors import UserError


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """``--model`` / ``--data`` are the common overrides; spelled as flags because every run names them."""
    extra = [f"model.path={args.model}"] if args.model else []
    extra += [f"data.path={args.data}"] if args.data else []
    return extra + list(args.overrides)


def _default_output(args: argparse.Namespace) -> Path:
    return Path(args.output) if args.output else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _check_vram(vram: float | None) -> None:
    if vram is not None and vram <= 0:
        raise UserError(f"--vram {vram:g}: the GPU's memory in GB, e.g. --vram 12")


def cmd_train(args: argparse.Namespace) -> int:
    """Validate everything first (cheap), then train; prints where the LoRA file is."""
    preset, overrides = args.preset, _run_overrides(args)
    main_process = os.environ.get("RANK", "0") == "0"  # print once per run, not per process
    _check_vram(args.vram)
    from soar_lite.plan import resolve_swap_auto

    overrides, notes = resolve_swap_auto(preset, overrides, args.vram)  # unchanged without auto
    if notes and main_process:
        print("\n".join(notes))
    if preset == "auto" or args.vram is not None:
        from soar_lite.plan import fit

        preset, overrides, notes = fit(preset, overrides, args.vram)
        if main_process:
            print("\n".join(notes))
    cfg = config.load_config(preset, overrides)
    if args.vram is None and preset != "auto" and main_process:
        from soar_lite.plan import fit_warning

        warning = fit_warning(cfg, preset, overrides)
        if warning:
            print(warning, file=sys.stderr)
    output = _default_output(args)
    from soar_lite.train import train

    folder = train(cfg, output, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if main_process:
        for arm in cfg.arms or [""]:
            print(f"LoRA: {folder / arm / 'pytorch_lora_weights.safetensors'}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Run only the cache stage: check the data, encode what is not cached yet, free the encoders.

    ``--output`` here names the cache folder (default: ``data.cache_dir``, else the shared one).
    """
    extra = [f"data.cache_dir={args.output}"] if args.output else []
    cfg = config.load_config(args.preset, _run_overrides(args) + extra)
    if args.info or args.prune:
        if args.older_than < 0:
            raise UserError(f"--older-than {args.older_than:g}: a number of days, 0 or more")
        from soar_lite import cache

        before = cache.usage(cache.cache_root(cfg.data.cache_dir), args.older_than, prune=args.prune)
        print(before.summary())
        if args.prune:
            n, shards, freed = before.stale_manifests, before.prunable_shards, before.prunable_bytes / 1e9
            print(f"pruned {n} dataset manifests; {shards} shards rewritten or deleted (~{freed:.2f} GB)")
        return 0
    from soar_lite.train import make_accelerator, prepare_data, resolve_model

    acc = make_accelerator(cfg)
    data = prepare_data(cfg, resolve_model(cfg.model.path), Path("."), acc, not args.quiet)
    print(f"cached {len(data)} items in {len(data.bucket_sizes)} bucket(s); manifest: {data.manifest}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Write a caption .txt next to each image of a folder that has none (any image-to-text model)."""
    from soar_lite.caption import DEFAULT_MODEL, caption_folder

    report = caption_folder(
        args.data,
        args.model or DEFAULT_MODEL,
        overwrite=args.overwrite,
        prompt=args.prompt,
        prefix=args.prefix,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(report.summary())
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """List presets with their headers, show one as resolved settings, or list every settable key."""
    if args.keys:
        for path, hint in config.LEAVES.items():
            print(f"{path}  ({getattr(hint, '__name__', hint)})")
        return 0
    if args.name:
        cfg = config.load_config(args.name, args.overrides)
        print(config.preset_header(args.name))
        print(json.dumps(config.config_to_dict(cfg), indent=2))
        return 0
    for name in config.preset_names():
        header = config.preset_header(name).splitlines()
        print(f"{name:10s} {header[1] if len(header) > 1 else ''}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Estimated peak GPU memory of a preset on a model, from its config alone (no weights)."""
    from soar_lite.doctor import system_memory
    from soar_lite.plan import plan, resolve_swap_auto, suggest, tier_of

    _check_vram(args.vram)
    tier = args.vram if args.vram is not None else tier_of(args.preset)
    overrides, notes = resolve_swap_auto(args.preset, list(args.overrides), tier, args.model)
    if notes:
        print("\n".join(notes))
    cfg = config.load_config(args.preset, overrides)
    model = args.model or cfg.model.path
    result = plan(cfg, model, tier)
    print(result.render())
    memory = system_memory()
    if memory is not None:  # peak system RAM matters as much as the card's (USER-PAINS)
        print(result.ram_verdict(memory[0]))
    if result.fits is False:
        found = suggest(args.preset, overrides, model, tier)
        if found is None:
            print(f"no change in the planner's list fits {tier:g} GB: use a smaller model or a larger card")
        else:
            print(f"fits {tier:g} GB with: {' '.join(found[0])}  (estimate {found[1].total:.2f} GiB)")
    return 0


def _lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:STRENGTH`` (a drive letter's colon is part of the path, not a strength)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _run_base_model(lora: str) -> str | None:
    """The base model recorded next to a soar-lite LoRA (its run folder's soar_lite_run.json), if any."""
    folder = Path(lora) if Path(lora).is_dir() else Path(lora).parent
    record = folder / "soar_lite_run.json"
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8")).get("base_model")
    return None


def _model_for(args: argparse.Namespace, loras: Sequence[str]) -> str:
    """--model, else the base the (first) LoRA was trained on, else the built-in tiny base."""
    if args.model:
        return args.model
    found = [m for m in (_run_base_model(path) for path in loras) if m]
    return found[0] if found else config.BUILTIN


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        text = Path(args.prompts_file).read_text(encoding="utf-8")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts-file (one prompt per line)")
    return prompts


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of integers") from None


def cmd_sample(args: argparse.Namespace) -> int:
    """Images for every prompt x seed with the LoRAs at their strengths; PNGs carry their settings."""
    from soar_lite.sample import sample

    loras = [_lora_arg(text) for text in args.lora or []]
    output = Path(args.output) if args.output else Path("samples") / time.strftime("%Y%m%d-%H%M%S")
    results = sample(
        _model_for(args, [p for p, _ in loras]),
        _prompts(args),
        loras=loras,
        seeds=_seeds(args.seeds),
        steps=args.steps,
        guidance_scale=args.cfg,
        height=args.height,
        width=args.width,
        output=output,
        device=args.device,
        batch_size=args.batch_size,
    )
    print(f"wrote {len(results)} images to {output}")
    return 0


def _arms(args: argparse.Namespace) -> dict[str, str | None]:
    """--run RUN gives base and every arm of a multi-arm run (objective=both or a list, as its
    record names them); --arm NAME=PATH adds any LoRA."""
    arms: dict[str, str | None] = {} if args.no_base else {"base": None}
    if args.run:
        for arm in run_arm_names(Path(args.run)):
            if not (Path(args.run) / arm).is_dir():
                raise UserError(f"{args.run} has no {arm}/ folder: its {arm} arm has not started")
            arms[arm] = str(Path(args.run) / arm)
    for item in args.arm or []:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise UserError(f"--arm {item!r} is not NAME=PATH")
        arms[name] = None if path.lower() in ("", "none", "base") else path
    if len(arms) < 2:
        raise UserError("compare needs at least two arms: --run RUN, or --arm NAME=LORA (base is added)")
    return arms


def run_arm_names(run: Path) -> tuple[str, ...]:
    """The arms of a multi-arm run folder: from its config (config.yaml, written at the start), else
    the arm folders holding a record (runs from before objective lists: sft, soar)."""
    from soar_lite.run_folder import ARMS, RUN_RECORD, arm_names

    objective = config.saved_objective(run)
    arms = arm_names(objective) if objective else tuple(a for a in ARMS if (run / a / RUN_RECORD).is_file())
    if not arms:
        raise UserError(f"{run} is not a multi-arm run (objective=both or a list such as sft,soar,scheduled)")
    return arms


def cmd_compare(args: argparse.Namespace) -> int:
    """The same prompts and seeds through every arm; one labelled grid plus the single images."""
    from soar_lite.sample import compare

    arms = _arms(args)
    default = Path(args.run) / "compare" if args.run else Path("compare") / time.strftime("%Y%m%d-%H%M%S")
    result = compare(
        _model_for(args, [p for p in arms.values() if p]),
        arms,
        _prompts(args),
        _seeds(args.seeds),
        steps=args.steps,
        guidance_scale=args.cfg,
        height=args.height,
        width=args.width,
        output=Path(args.output) if args.output else default,
        device=args.device,
        batch_size=args.batch_size,
    )
    print(f"grid: {result.grid}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a LoRA in another layout (kohya / SAI-native names with fused qkv and alpha, or comfyui)."""
    from soar_lite.export import export_lora

    source = Path(args.lora)
    output = Path(args.output) if args.output else (source if source.is_dir() else source.parent)
    path = export_lora(args.lora, args.format, output, strength=args.strength)
    print(f"wrote {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fuse LoRA(s) into the base transformer and save it as a diffusers folder."""
    from soar_lite.export import merge_lora

    loras = [_lora_arg(text) for text in args.lora]
    path = merge_lora(_model_for(args, [p for p, _ in loras]), loras, args.output, overwrite=args.overwrite)
    print(f"merged transformer: {path}")
    return 0


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="SD3/SD3.5 or FLUX.1 folder or hub id (default: the LoRA base)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the family's, 28; FLUX.1-schnell 4)")
    p.add_argument(
        "--cfg", type=float,
        help="guidance: CFG scale (SD3, default 4.5) or embedded guidance (FLUX.1-dev, default 3.5)",
    )  # fmt: skip
    p.add_argument("--height", type=int, help="default: the model's own resolution, else 1024")
    p.add_argument("--width", type=int, help="default: the model's own resolution, else 1024")
    p.add_argument("--output", help="folder for the PNGs")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--batch-size", type=int, default=1, help="images per sampler call (default 1)")


def _add_interop_args(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of sample / compare / export / merge (kept out of build_parser's table loop)."""
    if name in ("sample", "compare"):
        _add_sample_args(p)
    if name == "sample":
        p.add_argument("--lora", action="append", metavar="PATH[:STRENGTH]", help="LoRA file or run folder")
    if name == "compare":
        p.add_argument("--run", help="a multi-arm run (objective=both or a list): base and every arm")
        p.add_argument("--arm", action="append", metavar="NAME=PATH", help="another arm (LoRA file or run)")
        p.add_argument("--no-base", action="store_true", help="leave out the base-model column")
    if name == "export":
        p.add_argument("lora", help="LoRA file or run folder (diffusers or kohya layout)")
        p.add_argument("--format", default="kohya", choices=("kohya", "comfyui", "diffusers"))
        p.add_argument("--output", help="file or folder (default: next to the LoRA)")
        p.add_argument("--strength", type=float, default=1.0, help="fold this strength into the file")
    if name == "merge":
        p.add_argument("lora", nargs="+", metavar="PATH[:STRENGTH]", help="LoRA file(s) or run folder(s)")
        p.add_argument("--model", help="base SD3/SD3.5 folder or hub id (default: the LoRA's base)")
        p.add_argument("--output", required=True, help="folder for the merged diffusers transformer")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the Gradio app: this machine only unless --host says otherwise (then use --auth)."""
    from app.server import serve

    return serve(args.host, args.port, args.auth, args.runs_dir, args.allow_folder, args.max_runs)


def _add_app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login (default: $SOAR_LITE_AUTH)")
    p.add_argument("--runs-dir", default="runs", help="where runs and uploaded datasets live (default runs/)")
    p.add_argument(
        "--allow-folder",
        action="append",
        default=[],
        metavar="DIR",
        help="a server folder the app may also read and write (datasets, caches); repeatable; none default",
    )
    p.add_argument(
        "--max-runs", type=int, default=1, help="runs training at once; more wait in a queue (default 1)"
    )


BENCHES = ("step", "cache", "quality", "swap")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one benchmark module's ``main(output, **knobs)``; it writes JSON to ``--output``."""
    import importlib

    try:
        module = importlib.import_module(f"soar_lite.bench.{args.name}")
    except ModuleNotFoundError:
        raise UserError(f"benchmark {args.name!r} is not available in this version") from None
    knobs = {}
    for item in args.knobs:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"benchmark option {item!r} is not key=value")
        knobs[key] = _literal(raw)
    if args.objectives:
        knobs["objectives"] = args.objectives
    output = Path(args.output or f"benchmarks/{args.name}.json")
    try:
        result = module.main(output, **knobs)
    except TypeError as exc:
        raise UserError(f"bench {args.name}: {exc}") from None
    print(json.dumps(result.get("summary", {}), indent=2))
    print(f"wrote {output}")
    return 0


def _literal(raw: str) -> object:
    """``6`` -> 6, ``1,2,6`` -> (1, 2, 6), ``cpu`` -> 'cpu': benchmark knobs from the command line."""
    import ast

    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    return tuple(value) if isinstance(value, list) else value


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check this machine (GPU, torch build, packages, quant backends, RAM, disk, presets); 1 on FAIL."""
    from soar_lite.doctor import doctor

    return doctor(as_json=args.json)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default="cpu-tiny", help="a preset (soar-lite presets), .yaml or run folder; train: auto"
    )
    p.add_argument("--model", help="diffusers SD3/SD3.5 folder or hub id (default: built-in tiny base)")
    p.add_argument("--data", help="folder of images with same-name .txt captions (default: built-in shapes)")
    p.add_argument("--output", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=200 lr=5e-5 objective=sft")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soar-lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "train": (cmd_train, "train a LoRA with SOAR (or SFT, or both arms)"),
        "cache": (cmd_cache, "encode a dataset once (latents + text embeddings)"),
        "caption": (cmd_caption, "write captions for images that have none (BLIP, Florence-2, ...)"),
        "presets": (cmd_presets, "list presets, show one, or list every key"),
        "plan": (cmd_plan, "estimate peak GPU memory of a preset on a model (no weights needed)"),
        "bench": (cmd_bench, "run a benchmark (step | cache | quality | swap) and write its JSON"),
        "sample": (cmd_sample, "generate images: base model + optional LoRA(s), prompts x seeds"),
        "compare": (cmd_compare, "same prompts and seeds through base / SFT / SOAR (or any LoRAs): a grid"),
        "export": (cmd_export, "write a LoRA in kohya (SAI-native) or comfyui layout"),
        "merge": (cmd_merge, "fuse LoRA(s) into the base transformer (diffusers folder)"),
        "app": (cmd_app, "serve the web app (Gradio) on 127.0.0.1:7860"),
        "doctor": (cmd_doctor, "check this machine: GPU, torch/CUDA, packages, quant backends, RAM, disk"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if name in ("train", "cache"):
            _add_run_args(p)
        _add_interop_args(name, p)
        if name == "cache":
            p.add_argument("--info", action="store_true", help="show the cache's size and what --prune frees")
            p.add_argument(
                "--prune",
                action="store_true",
                help="delete datasets unused for --older-than days, and their tensors",
            )
            p.add_argument("--older-than", type=float, default=30.0, metavar="DAYS", help="for --prune (30)")
        if name == "train":
            p.add_argument("--resume", help="'latest' or a checkpoint folder of this --output")
            p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")
            p.add_argument(
                "--vram",
                type=float,
                help="GPU GB to fit (apply the planner's changes if needed); with --preset auto",
            )
        if name == "caption":
            p.add_argument("--data", required=True, help="folder of images (captions go to same-name .txt)")
            p.add_argument("--model", help="image-to-text model: hub id or folder (default: BLIP-large)")
            p.add_argument("--overwrite", action="store_true", help="re-caption images that have a caption")
            p.add_argument(
                "--prompt", help='text to continue, e.g. "a photo of" (Florence-2: its task token)'
            )
            p.add_argument("--prefix", default="", help='put in front of every caption, e.g. "ohwx, "')
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "presets":
            p.add_argument("name", nargs="?", help="show this preset resolved")
            p.add_argument("overrides", nargs="*", metavar="key=value")
            p.add_argument("--keys", action="store_true", help="list every settable key")
        if name == "plan":
            p.add_argument("--preset", default="24gb", help="preset name or .yaml path")
            models = "sd3.5-medium | sd3.5-large | flux.1-dev | qwen-image | hub id | pipeline folder"
            p.add_argument("--model", help=models)
            p.add_argument("--vram", type=float, help="GPU memory in GB to plan for (default: preset's tier)")
            p.add_argument("overrides", nargs="*", metavar="key=value")
        if name == "app":
            _add_app_args(p)
        if name == "bench":
            p.add_argument("name", choices=BENCHES)
            p.add_argument("--output", help="JSON path (default: benchmarks/NAME.json)")
            p.add_argument("knobs", nargs="*", metavar="key=value", help="e.g. repeats=10 ks=1,2,6")
            p.add_argument(
                "--objectives", help="bench quality: the trained arms, e.g. sft,soar,scheduled,reflexflow"
            )
        if name == "doctor":
            p.add_argument("--json", action="store_true", help="print a machine-readable record instead")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` items may also come after the flags (argparse alone
    rejects a positional list that follows an option once it has been consumed empty)."""
    args, extra = parser.parse_known_args(argv)
    target = next((name for name in ("knobs", "overrides") if hasattr(args, name)), None)
    bad = [item for item in extra if item.startswith("-") or "=" not in item or target is None]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        getattr(args, target).extend(extra)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soar-lite`` console script."""
    args = _parse(build_parser(), argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"soar-lite: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
