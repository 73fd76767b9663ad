"""``python -m sacode train PRESET [--algo NAME] [--profile ci|class|full] [--set key=value ...] [--out DIR]
[--seed N] [--overwrite] [--resume DIR] [--show-config] [--list]`` — one fine-tuning run with a progress bar.

A new run refuses a directory that already holds a run (--overwrite replaces it, --resume DIR continues it).
--resume DIR alone identifies the run: a PRESET, --algo, --profile, --seed or --out given with it must match the
stored run, and --set may change only iterations, progress, checkpoint_every and eval_batch.

exit status: 0 done; 2 the command cannot run as given (an invalid value, a directory that holds a run, a resume
that does not match the stored run, an unreadable checkpoint, missing model weights); 3 training diverged
(summary.json has "status": "diverged" and the last finite metrics); 130 stopped by Ctrl-C or SIGTERM after
writing a checkpoint (continue with --resume DIR).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def resume_config(args: argparse.Namespace):
    """The stored configuration of the run in ``args.resume`` with the allowed ``--set`` overrides, and the sources
    of its values (for --show-config). Raises RunError listing every argument that differs from the stored run."""
    from .. import registry
    from ..engine.config import RESUME_KEYS, ResolvedConfig, TrainConfig, apply_overrides, parse_sets
    from ..engine.divergence import RunError
    from ..engine.rundir import CONFIG, read_json

    d = Path(args.resume)
    if not d.is_dir():
        raise RunError(f"--resume {d}: no such directory")
    if not (d / CONFIG).exists():
        raise RunError(f"{d} holds no run ({d / CONFIG} not found): --resume needs the directory of an earlier run")
    stored = read_json(d / CONFIG, "the run's configuration")
    try:
        cfg = TrainConfig(**stored)
    except TypeError as e:
        raise RunError(f"{d / CONFIG} is not a run configuration of this version of sacode ({e})") from None
    given = {"PRESET": (args.preset, cfg.preset), "--algo": (args.algo, cfg.algo),
             "--profile": (args.profile, cfg.profile), "--seed": (args.seed, cfg.seed)}
    diffs = [f"{name} {g} (the run's: {s})" for name, (g, s) in given.items() if g is not None and g != s]
    if args.out is not None and Path(args.out).resolve() != d.resolve():
        diffs.append(f"--out {args.out} (the run's directory is {d})")
    if diffs:
        raise RunError(f"--resume {d} continues the run stored there and these arguments differ from it: "
                       f"{'; '.join(diffs)}. Leave them out, or start a new run without --resume")
    sets = parse_sets(args.sets)
    cfg = apply_overrides(cfg, sets, registry.get(cfg.preset).task.options, allowed=RESUME_KEYS)
    sources = {k: f"stored run ({d / CONFIG})" for k in list(cfg.to_dict()) + list(cfg.options)}
    sources |= {k: "--set" for k in sets}
    return cfg, ResolvedConfig(cfg, sources)


def main(argv: list[str] | None = None) -> int:
    from .. import registry
    from ..engine.config import parse_sets
    from ..engine.divergence import Diverged, Interrupted, RunError
    from ..engine.rundir import describe_run, holds_run
    from ..runs import resolve, train

    p = argparse.ArgumentParser(prog="python -m sacode train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", help="preset name, e.g. gauss1d-linear (omit with --resume; see --list)")
    p.add_argument("--algo", default=None, help="ctpo | ctpo-pathwise | ddpo | dpok | backprop (default ctpo)")
    p.add_argument("--profile", default=None, help="ci | class | full (default: $SACODE_PROFILE or class)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); --show-config lists the keys")
    p.add_argument("--out", default=None, help="run directory (default runs/PRESET-ALGO-seedN)")
    p.add_argument("--seed", type=int, default=None, help="seed of the run (default 0)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the run directory")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved configuration and where each value came from, then exit")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = None
    try:
        if args.list:
            for name, pr in registry.presets().items():
                print(f"{name:<26} {pr.family:<7} {pr.description}")
            return 0
        if args.resume:
            if args.overwrite:
                raise RunError("--overwrite starts a new run and --resume continues one; give one of them")
            cfg, resolved = resume_config(args)
            out = Path(args.resume)
        else:
            if not args.preset:
                p.error("give a PRESET or --resume DIR")
            from ..profiles import profile
            algo = args.algo or "ctpo"
            seed = 0 if args.seed is None else args.seed
            resolved = resolve(args.preset, algo, args.profile or profile(), seed, parse_sets(args.sets))
            cfg = resolved.cfg
            out = Path(args.out or f"runs/{args.preset}-{algo}-seed{seed}")
        if args.show_config:
            print(resolved.table())
            return 0
        if not args.resume:
            if out.exists() and not out.is_dir():
                raise RunError(f"--out {out} is a file, not a directory")
            if holds_run(out) and not args.overwrite:
                raise RunError(f"{out} already holds a run ({describe_run(out)}); continue it with "
                               f"`python -m sacode train --resume {out}`, replace it with --overwrite, or choose "
                               "another --out")
        if args.no_progress:
            cfg = cfg.replace(progress=False)
        summary = train(cfg, out, resume=bool(args.resume), stop_on_signals=True)
    except Interrupted as e:
        print(f"{e}; continue with: python -m sacode train --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:                           # a second Ctrl-C: stopped at once, mid-iteration
        where = (f"; continue from its last checkpoint with: python -m sacode train --resume {out}"
                 if out is not None and (out / "checkpoint.pt").exists() else "; no checkpoint was written")
        print(f"interrupted at once (second Ctrl-C){where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (KeyError, ValueError, FileNotFoundError, RunError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(summary, indent=1))
    print(f"run directory: {out}")
    return 0
