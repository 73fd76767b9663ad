"""``python -m sacode train PRESET [--algo NAME] [--profile ci|class|full] [--set key=value ...] [--out DIR]
[--seed N] [--resume DIR] [--show-config] [--list]`` — one fine-tuning run with a progress bar."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .. import registry
    from ..engine.config import TrainConfig, apply_overrides, parse_sets
    from ..runs import resolve, train

    p = argparse.ArgumentParser(prog="python -m sacode train", description=__doc__)
    p.add_argument("preset", nargs="?", help="preset name, e.g. gauss1d-linear (omit with --resume; see --list)")
    p.add_argument("--algo", default="ctpo", help="ctpo | ctpo-pathwise | ddpo | dpok | backprop")
    p.add_argument("--profile", default=None, help="ci | class | full (default: $SACODE_PROFILE or class)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); --show-config lists the keys")
    p.add_argument("--out", default=None, help="run directory (default runs/PRESET-ALGO-seedN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved configuration and where each value came from, then exit")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.list:
            for name, pr in registry.presets().items():
                print(f"{name:<26} {pr.family:<7} {pr.description}")
            return 0
        if args.resume:
            d = Path(args.resume)
            if not (d / "config.json").exists():
                raise FileNotFoundError(f"{d}/config.json not found: --resume needs the directory of an earlier run")
            cfg = TrainConfig(**json.loads((d / "config.json").read_text()))
            cfg = apply_overrides(cfg, parse_sets(args.sets), registry.get(cfg.preset).task.options)
            out = d
        else:
            if not args.preset:
                p.error("give a PRESET or --resume DIR")
            from ..profiles import profile
            prof = args.profile or profile()
            resolved = resolve(args.preset, args.algo, prof, args.seed, parse_sets(args.sets))
            if args.show_config:
                print(resolved.table())
                return 0
            cfg = resolved.cfg
            out = Path(args.out or f"runs/{args.preset}-{args.algo}-seed{args.seed}")
        if args.no_progress:
            cfg = cfg.replace(progress=False)
        summary = train(cfg, out, resume=bool(args.resume))
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    print(f"run directory: {out}")
    return 0
