"""Pretrained toy score models: small MLPs trained by denoising score matching, committed as checkpoints.

Fine-tuning must also work when s_pre is imperfect, as it always is in practice. For each (data law, SDE)
pair of the toy presets, ``python -m sacode pretrain toys`` trains a :class:`~sacode.engine.nets.ScoreMLP` with
:func:`~sacode.theory.dsm.train_dsm` from a fixed seed and writes ``sacode/envs/toys/checkpoints/toy-<key>.pt`` with a JSON record
of the command, seed, steps and final loss. ``load_toy_score(preset)`` returns the model for a preset.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ...theory.dsm import train_dsm
from ...engine.nets import ScoreMLP
from ...theory.presets import TOY_PRESETS, ToyPreset, toy_preset

TOY_CKPT_DIR = Path(__file__).parent / "checkpoints"
TRAIN = dict(steps=4000, batch=512, lr=2e-3, hidden=128, depth=3, seed=0)


def toy_key(preset: ToyPreset) -> str:
    """Presets that share the data law and the SDE share a pretrained model."""
    data = "ring8" if preset.data.K > 1 else f"gauss{preset.data.d}d"
    return f"{data}-vp{preset.sde.b_max:g}"


def _arch(preset: ToyPreset) -> ScoreMLP:
    return ScoreMLP(preset.sde, preset.data.d, hidden=TRAIN["hidden"], depth=TRAIN["depth"])


def pretrain_toy(preset: ToyPreset, progress: bool = True) -> dict:
    """Train and save the DSM score model of ``preset``'s (data, SDE) pair; returns its record."""
    torch.manual_seed(TRAIN["seed"])
    model = _arch(preset).double()
    data = preset.data
    t0 = time.perf_counter()
    log = train_dsm(model, preset.sde, lambda n, g: data.sample(n, g), steps=TRAIN["steps"], batch=TRAIN["batch"],
                    lr=TRAIN["lr"], seed=TRAIN["seed"], progress=progress)
    key = toy_key(preset)
    rec = {"key": key, "command": "python -m sacode pretrain toys", "train": TRAIN, "sde": repr(preset.sde),
           "data": repr(data), "final_loss": log[-1]["loss"], "wall_s": time.perf_counter() - t0,
           "torch": torch.__version__}
    TOY_CKPT_DIR.mkdir(exist_ok=True)
    torch.save({k: v.float() for k, v in model.state_dict().items()}, TOY_CKPT_DIR / f"toy-{key}.pt")
    (TOY_CKPT_DIR / f"toy-{key}.json").write_text(json.dumps(rec, indent=1))
    return rec


def load_toy_score(preset: ToyPreset) -> ScoreMLP:
    """The committed DSM-trained score model for ``preset`` (float64, eval mode, frozen)."""
    path = TOY_CKPT_DIR / f"toy-{toy_key(preset)}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; create it with `python -m sacode pretrain toys`")
    with torch.random.fork_rng():         # building the module must not consume the caller's random numbers
        model = _arch(preset)
    model.load_state_dict(torch.load(path, weights_only=True))
    model = model.double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sacode pretrain", description="Train the pretrained models.")
    p.add_argument("what", choices=["toys"], help="which pretrained models to (re)build")
    args = p.parse_args(argv)
    if args.what == "toys":
        done = set()
        for name in TOY_PRESETS:
            pr = toy_preset(name)
            if toy_key(pr) in done:
                continue
            done.add(toy_key(pr))
            rec = pretrain_toy(pr)
            print(json.dumps(rec))
    return 0
