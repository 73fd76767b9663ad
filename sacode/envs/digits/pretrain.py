"""The committed pretrained models of chapter 11 and how to rebuild them from their seeds.

* ``python -m sacode pretrain digits-classifier`` trains :class:`~sacode.envs.digits.classifier.DigitClassifier` and writes
  ``sacode/envs/digits/checkpoints/digits-classifier.{pt,json}`` (command, seed, epochs, loss, accuracies).
* ``python -m sacode pretrain digits`` trains the UNet score model by denoising score matching under the VP SDE
  b(s) = 0.1 + 19.9 s (T = 1) and writes ``sacode/envs/digits/checkpoints/digits-unet.{pt,json}`` (command, seed, steps, loss,
  and the Frechet distances of its samples, with the scale references). It needs the classifier for the FD, so
  build that first. The weights saved are the exponential moving average of the training iterates (decay 0.999),
  which gives visibly cleaner samples than the last iterate (Song & Ermon 2020).

Runs are seeded; bit-for-bit equality across machines is not promised (BLAS reductions differ), equality of the
recorded loss and FD to a few per cent is.
"""
from __future__ import annotations

import copy
import json
import math
import time
from functools import lru_cache
from pathlib import Path

import torch

from ...dynamics.grid import TimeGrid, default_s_end
from ...dynamics.samplers import reverse_sde_sample
from ...dynamics.sde import VPSDE
from .classifier import DigitClassifier, accuracy, train_classifier
from .data import digits
from .unet import DigitsScoreModel, n_params

DIGITS_CKPT_DIR = Path(__file__).resolve().parent / "checkpoints"
UNET_PT, UNET_JSON = DIGITS_CKPT_DIR / "digits-unet.pt", DIGITS_CKPT_DIR / "digits-unet.json"
CLF_PT, CLF_JSON = DIGITS_CKPT_DIR / "digits-classifier.pt", DIGITS_CKPT_DIR / "digits-classifier.json"

DIGITS_SDE = VPSDE(0.1, 20.0, 1.0)
UNET_ARCH = dict(ch=32, ch2=64, t_dim=128, attention=False)
UNET_TRAIN = dict(steps=8000, batch=64, lr=2e-3, warmup=200, ema=0.999, s_min=1e-3, seed=0)
CLF_TRAIN = dict(epochs=30, batch=64, lr=2e-3, weight_decay=1e-4, seed=0)
# samplers at which the pretrained model's sample quality is recorded: (method, eta, K)
QUALITY_SAMPLERS = [("ddim", 1.0, 10), ("ddim", 1.0, 20), ("ddim", 1.0, 100), ("em", 1.0, 20), ("em", 1.0, 100),
                    ("ddim", 0.0, 20)]
N_QUALITY = 1000


def digits_sde() -> VPSDE:
    return DIGITS_SDE


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is missing; rebuild it with `python -m sacode pretrain {what}`")


@lru_cache(maxsize=1)
def load_classifier() -> DigitClassifier:
    """The committed digit classifier (float32, eval mode, frozen)."""
    if not CLF_PT.exists():
        raise _missing(CLF_PT, "digits-classifier")
    with torch.random.fork_rng():         # building the module must not consume the caller's random numbers
        m = DigitClassifier()
    m.load_state_dict(torch.load(CLF_PT, weights_only=True))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@lru_cache(maxsize=1)
def load_score_model() -> DigitsScoreModel:
    """The committed pretrained UNet score model (float32, eval mode, frozen)."""
    if not UNET_PT.exists():
        raise _missing(UNET_PT, "digits")
    with torch.random.fork_rng():         # building the module must not consume the caller's random numbers (so a
        m = DigitsScoreModel(DIGITS_SDE, **UNET_ARCH)     # run does not depend on whether it was loaded before)
    m.load_state_dict(torch.load(UNET_PT, weights_only=True))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@torch.no_grad()
def sample(score_model, n: int, K: int = 20, method: str = "ddim", eta: float = 1.0, seed: int = 0,
           batch: int = 1000) -> torch.Tensor:
    """n samples (n, 1, 8, 8) of a score model with a uniform K-step grid (float32)."""
    gen = torch.Generator().manual_seed(seed)
    grid, out = TimeGrid.uniform(DIGITS_SDE.T, K, default_s_end(method, DIGITS_SDE.T)), []
    for j in range(0, n, batch):
        m = min(batch, n - j)
        x0 = DIGITS_SDE.prior_sample((m, 1, 8, 8), gen, dtype=torch.float32)
        out.append(reverse_sde_sample(DIGITS_SDE, score_model, x0, grid, method, eta, generator=gen).x)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# classifier
# ------------------------------------------------------------------------------------------------
def pretrain_classifier() -> dict:
    x, y = digits("train")
    xh, yh = digits("heldout")
    t0 = time.perf_counter()
    model, log = train_classifier(x, y, **CLF_TRAIN)
    rec = {"command": "python -m sacode pretrain digits-classifier", "train": CLF_TRAIN, "arch": model.config,
           "params": n_params(model), "final_loss": log[-1]["loss"], "train_accuracy": accuracy(model, x, y),
           "heldout_accuracy": accuracy(model, xh, yh), "n_train": int(x.shape[0]), "n_heldout": int(xh.shape[0]),
           "wall_s": time.perf_counter() - t0, "torch": torch.__version__}
    DIGITS_CKPT_DIR.mkdir(exist_ok=True)
    torch.save(model.state_dict(), CLF_PT)
    CLF_JSON.write_text(json.dumps(rec, indent=1))
    load_classifier.cache_clear()
    return rec


# ------------------------------------------------------------------------------------------------
# score model
# ------------------------------------------------------------------------------------------------
def train_unet(steps: int | None = None, progress_path: Path | None = None, snapshot: Path | None = None) -> tuple:
    """Denoising score matching, eps-parametrised: E || eps_theta(s, alpha x0 + sigma z) - z ||^2, s ~ U(s_min, T).

    This is the sigma(s)^2-weighted DSM loss of :mod:`sacode.theory.dsm` divided by the dimension 64. Adam, linear warmup
    then cosine decay; an EMA copy of the weights is returned with the log.
    """
    cfg = dict(UNET_TRAIN)
    if steps is not None:
        cfg["steps"] = steps
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    x_train, _ = digits("train")
    sde = DIGITS_SDE
    model = DigitsScoreModel(sde, **UNET_ARCH)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    total, warm = cfg["steps"], cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    log, run, t0 = [], None, time.perf_counter()
    for it in range(total):
        idx = torch.randint(0, x_train.shape[0], (cfg["batch"],), generator=gen)
        x0 = x_train[idx]
        s = cfg["s_min"] + (sde.T - cfg["s_min"]) * torch.rand(cfg["batch"], generator=gen, dtype=torch.float64)
        z = torch.randn(x0.shape, generator=gen)
        xs = sde.marginal_sample(s.float(), x0, z)
        loss = ((model.eps_pred(s.float(), xs) - z) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(cfg["ema"]).add_(pm, alpha=1 - cfg["ema"])
        run = float(loss.detach()) if run is None else 0.99 * run + 0.01 * float(loss.detach())
        if (it + 1) % 100 == 0 or it == 0:
            log.append({"step": it + 1, "loss": run, "wall_s": time.perf_counter() - t0})
            if progress_path is not None:
                progress_path.write_text(json.dumps(log[-1]) + "\n")
        if snapshot is not None and (it + 1) % 1000 == 0:
            torch.save(ema.state_dict(), snapshot)
    return ema.eval(), log, cfg


def quality_references(classifier: DigitClassifier | None = None, seed: int = 0) -> dict:
    """Scale references for the FD: held-out vs training digits, and uniform noise images vs held-out digits."""
    from .quality import sample_quality

    clf = classifier or load_classifier()
    xh, _ = digits("heldout")
    xt, _ = digits("train")
    noise = 2 * torch.rand((N_QUALITY, 1, 8, 8), generator=torch.Generator().manual_seed(seed)) - 1
    return {"fd_train_vs_heldout": sample_quality(clf, xt, xh),
            "fd_train1000_vs_heldout": sample_quality(clf, xt[:N_QUALITY], xh),
            "fd_uniform_noise_vs_heldout": sample_quality(clf, noise, xh),
            "fd_gaussian_prior_vs_heldout": sample_quality(
                clf, torch.randn((N_QUALITY, 1, 8, 8), generator=torch.Generator().manual_seed(seed + 1)), xh)}


def quality_table(score_model, classifier: DigitClassifier | None = None, samplers=QUALITY_SAMPLERS,
                  n: int = N_QUALITY) -> dict:
    """FD to the held-out digits of n samples for each (method, eta, K) sampler."""
    from .quality import class_entropy, sample_quality

    clf = classifier or load_classifier()
    xh, _ = digits("heldout")
    out = {}
    for method, eta, K in samplers:
        x = sample(score_model, n, K, method, eta, seed=0)
        out[f"{method}-eta{eta:g}-K{K}"] = {"fd": sample_quality(clf, x, xh), "class_entropy": class_entropy(clf, x)}
    return out


def pretrain_digits(steps: int | None = None, progress_path: Path | None = None) -> dict:
    if not CLF_PT.exists():
        raise _missing(CLF_PT, "digits-classifier")
    t0 = time.perf_counter()
    model, log, cfg = train_unet(steps, progress_path, snapshot=DIGITS_CKPT_DIR / "digits-unet.partial.pt")
    wall = time.perf_counter() - t0
    DIGITS_CKPT_DIR.mkdir(exist_ok=True)
    torch.save(model.state_dict(), UNET_PT)
    (DIGITS_CKPT_DIR / "digits-unet.partial.pt").unlink(missing_ok=True)
    load_score_model.cache_clear()
    rec = {"command": "python -m sacode pretrain digits", "sde": repr(DIGITS_SDE), "arch": UNET_ARCH,
           "params": n_params(model), "train": cfg, "final_loss": log[-1]["loss"],
           "loss_curve": [(r["step"], round(r["loss"], 5)) for r in log[:: max(1, len(log) // 40)]],
           "wall_s": wall, "torch": torch.__version__}
    rec |= evaluate_record(model)
    UNET_JSON.write_text(json.dumps(rec, indent=1))
    return rec


def evaluate_record(model=None) -> dict:
    """The sample-quality part of the UNet's JSON record (FD per sampler, with the scale references)."""
    model = model or load_score_model()
    return {"sample_quality": {"metric": f"Frechet distance in the digit classifier's 64-d features to the "
                                         f"{int(digits('heldout')[0].shape[0])} held-out digits, n = {N_QUALITY} "
                                         f"samples, uniform grid",
                               "pretrained": quality_table(model), "references": quality_references()}}


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sacode pretrain", description="Train the chapter-10 models.")
    p.add_argument("what", choices=["digits", "digits-classifier"])
    p.add_argument("--steps", type=int, default=None, help="DSM steps (default: the committed run's)")
    p.add_argument("--eval-only", action="store_true", help="recompute the FD record of the committed UNet")
    p.add_argument("--progress", default=None, help="file to write the latest loss to")
    args = p.parse_args(argv)
    if args.what == "digits-classifier":
        rec = pretrain_classifier()
    elif args.eval_only:
        rec = json.loads(UNET_JSON.read_text()) if UNET_JSON.exists() else {}
        rec |= evaluate_record()
        UNET_JSON.write_text(json.dumps(rec, indent=1))
    else:
        rec = pretrain_digits(args.steps, Path(args.progress) if args.progress else None)
    print(json.dumps({k: v for k, v in rec.items() if k != "loss_curve"}, indent=1))
    return 0
