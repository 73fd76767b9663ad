"""Turn finished Stable Diffusion runs into the small result files chapter 12 reads (figures/sd-*).

``python -m sacode.envs.sd.report RUN_DIR [RUN_DIR ...] [--out figures]`` writes, for each run directory of
``python -m sacode train sd15-...``, ``figures/sd-run-PRESET-ALGO.json`` (the config, the summary, the per-iteration
curves including the rewards at other step counts, and the command that made the file) and copies the run's final
image grid to ``figures/sd-run-PRESET-ALGO-final.png``. The chapter plots only what these files contain.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

CURVE_KEYS = ("iteration", "samples_used", "wall_s", "reward", "kl_path", "approx_kl", "clip_frac", "value_loss")


def export_run(run_dir: str | Path, out: str | Path = "figures") -> Path:
    """Write figures/sd-run-PRESET-ALGO.json (+ -final.png) from a finished run directory; returns the JSON path."""
    run, out = Path(run_dir), Path(out)
    for f in ("config.json", "metrics.jsonl", "summary.json"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f} not found: {run} is not a finished `python -m sacode train` run")
    cfg = json.loads((run / "config.json").read_text())
    if not str(cfg["preset"]).startswith("sd"):
        raise ValueError(f"{run} is a {cfg['preset']!r} run, not a Stable Diffusion preset")
    curves = []
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        curves.append({k: v for k, v in rec.items() if k in CURVE_KEYS or k.startswith("eval_reward")})
    name = f"sd-run-{cfg['preset']}-{cfg['algo']}"
    res = {"preset": cfg["preset"], "algo": cfg["algo"], "config": cfg,
           "summary": json.loads((run / "summary.json").read_text()), "curves": curves,
           "command": "python -m sacode.envs.sd.report " + str(run)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(res, indent=1))
    if (run / "images" / "final.png").exists():
        shutil.copy(run / "images" / "final.png", out / f"{name}-final.png")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sacode.envs.sd.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories of sd15-* presets")
    p.add_argument("--out", default="figures")
    args = p.parse_args(argv)
    for r in args.runs:
        try:
            print(f"written: {export_run(r, args.out)}")
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
