"""``python -m sacode.bench.gpu_check WORK_DIR OUT.json``: the one JSON of ``scripts/gpu-check.sh``.

The script runs four steps and records, for each, its command, exit status and seconds in ``WORK_DIR/steps.tsv``:
the ``gpu``-marked tests (JUnit XML), ``bench sd-throughput`` (its JSON), two ``ctpo`` iterations end to end on the
random-weight SD v1.5 pipeline (sampling, rewards, value, LoRA update, export; its run directory), and ``bench
sd-cost`` (which folds the measured achieved FLOP/s into its GPU-time model). This module gathers them with the
machine's description into one JSON, and checks that the exported LoRA loads into a pipeline
(``StableDiffusionPipeline.load_lora_weights``).
"""
from __future__ import annotations

import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


def read_steps(work: Path) -> list[dict]:
    """The steps.tsv rows: name, exit status, seconds, command."""
    path = work / "steps.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, rc, seconds, cmd = line.split("\t", 3)
            rows.append({"step": name, "rc": int(rc), "seconds": float(seconds), "command": cmd})
    return rows


def read_junit(path: Path) -> dict | None:
    """Counts and the names of failed or skipped tests of a pytest JUnit XML file."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["not_passed"] = [f"{c.get('classname')}::{c.get('name')}: {child.tag}"
                         for c in suite.iter("testcase") for child in c if child.tag in ("failure", "error", "skipped")]
    return out


def read_run(run: Path) -> dict | None:
    """The end-to-end run: its summary, per-iteration metrics and what it wrote."""
    if not run.exists():
        return None
    out: dict = {"dir": str(run)}
    if (run / "summary.json").exists():
        out["summary"] = json.loads((run / "summary.json").read_text())
    if (run / "metrics.jsonl").exists():
        out["metrics"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    lora = run / "lora" / "pytorch_lora_weights.safetensors"
    out["lora_file_bytes"] = lora.stat().st_size if lora.exists() else None
    out["images"] = sorted(p.name for p in (run / "images").glob("*.png")) if (run / "images").exists() else []
    return out


def lora_loads(run: Path) -> dict:
    """Load the exported LoRA into a fresh random-weight SD v1.5 pipeline, as a user loads it into the real one."""
    lora = run / "lora"
    if not (lora / "pytorch_lora_weights.safetensors").exists():
        return {"ok": False, "error": "no exported LoRA"}
    from ..envs.sd.sd15 import build_sd15_random

    try:
        pipe = build_sd15_random("cuda" if torch.cuda.is_available() else "cpu", warn=False)
        pipe.load_lora_weights(str(lora))
        n = sum(1 for name, _ in pipe.unet.named_parameters() if "lora_" in name)
        return {"ok": n > 0, "lora_tensors": n}
    except Exception as e:        # noqa: BLE001 - recorded in the report, not raised
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def machine() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_memory_GiB": p.total_memory / 2**30, "cuda": torch.version.cuda,
                 "capability": f"{p.major}.{p.minor}", "gpus": torch.cuda.device_count()}
    for mod in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def collect(work: Path, dry_run: bool = False) -> dict:
    work = Path(work)
    steps = read_steps(work)
    bench = work / "bench" / "bench-sd-throughput.json"
    cost = work / "bench" / "sd-cost.json"
    run = work / "train"
    res = {"dry_run": dry_run, "machine": machine(), "steps": steps,
           "ok": bool(steps) and all(s["rc"] == 0 for s in steps),
           "gpu_tests": read_junit(work / "gpu-tests.xml"),
           "sd_throughput": json.loads(bench.read_text()) if bench.exists() else None,
           "sd_cost": json.loads(cost.read_text()) if cost.exists() else None,
           "ctpo_two_iterations": read_run(run)}
    if res["ctpo_two_iterations"] is not None:
        res["ctpo_two_iterations"]["lora_loads"] = lora_loads(run)
        res["ok"] = res["ok"] and res["ctpo_two_iterations"]["lora_loads"]["ok"]
    res["seconds"] = sum(s["seconds"] for s in steps)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sacode.bench.gpu_check", description=__doc__)
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    res = collect(Path(a.work), a.dry_run)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"gpu-check: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']:.0f} s); written {a.out}")
    for s in res["steps"]:
        print(f"  {s['step']:<18} rc={s['rc']}  {s['seconds']:6.0f} s")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
