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


def cmd_train(args: argparse.Namespace) -> int:
    """Validate everything first (cheap), then train; prints where the LoRA file is."""
    cfg = config.load_config(args.preset, _run_overrides(args))
    output = _default_output(args)
    from soar_lite.train import train

    folder = train(cfg, output, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    arms = ["sft", "soar"] if cfg.objective == "both" else [""]
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        for arm in arms:
            print(f"LoRA: {folder / arm / 'pytorch_lora_weights.safetensors'}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Run only the cache stage (encoders loaded, everything encoded, encoders freed)."""
    cfg = config.load_config(args.preset, _run_overrides(args))
    from accelerate import Accelerator

    from soar_lite.train import prepare_data, resolve_model

    output = _default_output(args)
    output.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, resolve_model(cfg.model.path), output, Accelerator(cpu=True), not args.quiet)
    print(f"cached {len(data)} items")
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


BENCHES = ("step", "cache", "quality")


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


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-tiny", help="preset name (soar-lite presets) or a .yaml path")
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
        "presets": (cmd_presets, "list presets, show one, or list every key"),
        "bench": (cmd_bench, "run a benchmark (step | cache | quality) and write its JSON"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if name in ("train", "cache"):
            _add_run_args(p)
        if name == "train":
            p.add_argument("--resume", help="'latest' or a checkpoint folder of this --output")
            p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")
        if name == "presets":
            p.add_argument("name", nargs="?", help="show this preset resolved")
            p.add_argument("overrides", nargs="*", metavar="key=value")
            p.add_argument("--keys", action="store_true", help="list every settable key")
        if name == "bench":
            p.add_argument("name", choices=BENCHES)
            p.add_argument("--output", help="JSON path (default: benchmarks/NAME.json)")
            p.add_argument("knobs", nargs="*", metavar="key=value", help="e.g. repeats=10 ks=1,2,6")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soar-lite`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"soar-lite: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
