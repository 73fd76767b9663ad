"""Stable Diffusion presets of ``python -m sacode train`` (chapter 12).

=============================  ====================================================================================
``sd15-compressibility``       SD v1.5 + LoRA, JPEG compressibility, animal prompts (DDPO's first task)
``sd15-aesthetic``             SD v1.5 + LoRA, LAION aesthetic score, animal prompts
``sd15-imagereward``           SD v1.5 + LoRA, ImageReward, the paper's single unicorn prompt (chapter 12)
``sd-tiny-compressibility``    the same code on a tiny random pipeline built locally: runs on a laptop CPU
=============================  ====================================================================================

The ``full`` profile of the sd15 presets is the paper's per-GPU setting (50 DDIM steps with eta = 1, guidance 7,
LoRA rank 4, AdamW, 100 epochs; chapter 12); ``ci`` and ``class`` are short smoke runs. The model is
``--set model=PATH_OR_HUB_ID``, else ``$SACODE_SD_MODEL``, else the hub id ``runwayml/stable-diffusion-v1-5``, always
loaded with ``local_files_only`` unless ``--set allow_download=true``. Multi-GPU: ``accelerate launch -m sacode train
sd15-... --profile full`` (one process per GPU; batch sizes are per process).
"""
from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ...engine.config import ALGORITHMS, ConfigTable, Param
from ...engine.task import Task
from .local_files import SD15_HUB_ID, SD15_MIRROR, check_local_files, hub_offline
from .rewards import REWARDS

MODEL_ENV = "SACODE_SD_MODEL"

MODEL_HELP = (
    "Stable Diffusion weights for {model!r} are not available locally ({err}).\n"
    "Fetch them once on a machine with network, e.g.\n"
    "  python -c \"from diffusers import StableDiffusionPipeline as P; P.from_pretrained('{mirror}')\"\n"
    "(the {hub} repository may no longer resolve on the hub; {mirror} holds the same weights), then run with\n"
    "  --set model={mirror}   (found in the Hugging Face cache), or --set model=/path/to/folder, or set {env};\n"
    "or let this run download: --set allow_download=true.")

# options of every SD preset (set with --set key=value like the engine's keys); model "" = $SACODE_SD_MODEL or the
# hub id
SD_OPTIONS: dict[str, Param] = {
    "model": Param("", str, "pipeline folder, hub id or sd15-random (random weights, cost only); empty: "
                  "$SACODE_SD_MODEL, else the SD v1.5 hub id"),
    "allow_download": Param(False, bool, "let the Hugging Face hub download missing files"),
    "reward": Param("compressibility", str, "reward", choices=REWARDS),
    "prompts": Param("animals", str, "prompt set: animals, unicorn, file:PATH or a literal prompt"),
    "guidance": Param(7.0, float, "classifier-free guidance scale w (1: no guidance)", ge=1.0),
    "resolution": Param(512, int, "image side in pixels", ge=8),
    "lora_rank": Param(4, int, "LoRA rank", ge=1),
    "lora_alpha": Param(0.0, float, "LoRA scale alpha (0: the rank)", ge=0.0),
    "lora_targets": Param("to_q,to_k,to_v,to_out.0", str, "comma-separated UNet modules that get adapters"),
    "amp": Param("auto", str, "mixed precision", choices=("auto", "no", "bf16", "fp16")),
    "grad_checkpointing": Param(False, bool, "recompute UNet activations in the backward pass"),
    "dtype": Param("float32", str, "dtype of the latents", choices=("float32", "float64")),
    "device": Param("auto", str, "device", choices=("auto", "cpu", "cuda")),
    "decode_batch": Param(16, int, "latents decoded per VAE call", ge=1),
    "image_every": Param(1, int, "iterations between image grids (0: never)", ge=0),
    "grid_images": Param(16, int, "images per grid", ge=1),
    "eval_steps": Param("25,100", str, "step counts of the robustness evaluations"),
    "eval_every": Param(10, int, "iterations between robustness evaluations (0: never)", ge=0),
    "eval_n": Param(32, int, "images per robustness evaluation", ge=1),
    "export_lora": Param(True, bool, "export the LoRA at the end of the run"),
    "aesthetic_mlp": Param("", str, "path of the LAION aesthetic MLP weights"),
    "clip_model": Param("", str, "CLIP ViT-L/14 folder or hub id for the aesthetic reward"),
    "imagereward": Param("", str, "ImageReward weights folder"),
}

# the paper's per-GPU settings. ctpo: the paper samples 2 x 64 images per GPU and takes 2 optimiser steps per epoch
# over 100 epochs; here one iteration is one batch of 64 (same samples per optimiser step, same total: 200 x 64 =
# 100 x 128). Log-densities are summed over the d = 4*64*64 latent dimensions (chapter 3), so the paper's clip ranges
# on per-dimension mean log-densities become d * eps: for the small changes PPO allows, exp(d * dl) - 1 ~ d * dl
# (chapter 12).
LATENT_DIM_512 = 4 * 64 * 64
SD15_CTPO = dict(iterations=200, batch=64, lr=5e-5, weight_decay=1e-4, clip=LATENT_DIM_512 * 1.5e-5,
                 minibatch=64 * 50, micro_batch=4, adv_norm="step", value_lr=1e-4, value_epochs=1, value_minibatch=100)
SD15_DDPO = dict(iterations=100, batch=64, lr=3e-5, weight_decay=1e-4, clip=LATENT_DIM_512 * 1e-5,
                 minibatch=32 * 50, micro_batch=4)
SD_COMMON = dict(method="ddim", eta=1.0, grid="native", K=50, adv_clip=5.0, max_grad_norm=1.0, value="structured",
                 hidden=64, depth=2)

SD15_CONFIG = ConfigTable(
    task=SD_COMMON,
    algos={a: (SD15_DDPO if a == "ddpo" else SD15_CTPO) for a in ALGORITHMS},
    profiles={"ci": dict(iterations=1, batch=2, K=5, eval_batch=2, minibatch=10, micro_batch=2, value_minibatch=10,
                         checkpoint_every=1, eval_every=0),
              "class": dict(iterations=5, batch=16, K=50, eval_batch=16, minibatch=16 * 50, checkpoint_every=5,
                            eval_every=0),
              "full": dict(eval_batch=64, checkpoint_every=10, eval_every=20)},    # every 20 x 64 = 1280 images/GPU
)
# the tiny random pipeline: a random network barely controls its images through attention alone (its only attention
# layers sit at the 2x2 latent level), so the tiny presets also adapt conv_out; see chapter 12
SD_TINY_CONFIG = ConfigTable(
    task=SD_COMMON | dict(lr=3e-2, value_lr=1e-3, clip=0.2, adv_norm="step", value_epochs=2, minibatch=160, K=5,
                          checkpoint_every=5, model="tiny", resolution=32, guidance=3.0, decode_batch=64,
                          grid_images=16, eval_every=1000, eval_n=16, eval_steps="2,10,20",
                          lora_targets="to_q,to_k,to_v,to_out.0,conv_out"),
    profiles={"ci": dict(iterations=2, batch=4, eval_batch=4, checkpoint_every=1, eval_every=0),
              "class": dict(iterations=10, batch=32, eval_batch=32),
              "full": dict(iterations=40, batch=32, eval_batch=64)},
)


class SDTask(Task):
    """A Stable Diffusion preset: loads the pipeline, builds the environment, the LoRA policy, and writes images,
    evaluations at other step counts and the exported LoRA."""

    config_table = SD15_CONFIG
    options = SD_OPTIONS
    artifacts = ("images", "lora")
    TINY = False

    def __init__(self, cfg, params=None):
        from .env import SDEnv
        from .prompts import PromptSampler
        from .rewards import make_reward

        super().__init__(cfg, params)
        o = cfg
        opt = cfg.options
        missing = set(SD_OPTIONS) - set(opt)
        if missing:
            raise KeyError(f"Stable Diffusion options missing from the config: {sorted(missing)}; build the config "
                           f"with sacode.runs.make_config({cfg.preset!r}, ...)")
        hub_offline(not opt["allow_download"])   # before diffusers/transformers are imported: no host look-ups
        check_local_files(resolve_model(opt["model"], tiny=self.TINY), opt, cfg.preset)   # all missing pieces at once
        device, cpu = resolve_device(opt["device"])
        amp = resolve_amp(opt["amp"], device)
        self.accelerate = {"cpu": cpu, "mixed_precision": amp}      # the trainer's Accelerator (engine/trainer.py)
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(opt["dtype"])
        if dtype is None:
            raise ValueError(f"dtype must be float32 or float64; got {opt['dtype']!r}")
        weight_dtype = {"no": dtype, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        model = resolve_model(opt["model"], tiny=self.TINY)
        pipe = load_pipeline(model, allow_download=bool(opt["allow_download"]), torch_dtype=weight_dtype,
                             device=device)
        reward = make_reward(opt["reward"], opt, device)
        self.env = SDEnv(pipe, reward, PromptSampler.named(opt["prompts"]), guidance=opt["guidance"],
                         resolution=int(opt["resolution"]), device=device, dtype=dtype, amp=amp,
                         decode_batch=int(opt["decode_batch"]))
        self.model = model
        self.beta = float(o.beta) if o.beta is not None else 0.0     # the paper's SD runs: no KL term (theory 3.1)
        self.policy = None

    def make_policy(self, cfg) -> torch.nn.Module:
        from .policy import LoRAScorePolicy

        opt = cfg.options
        targets = tuple(t for t in str(opt["lora_targets"]).replace(" ", "").split(",") if t)
        self.policy = LoRAScorePolicy(self.env, rank=int(opt["lora_rank"]), alpha=float(opt["lora_alpha"]) or None,
                                      target_modules=targets, grad_checkpointing=bool(opt["grad_checkpointing"]))
        return self.policy

    def summary(self, evaluation) -> dict:
        r, kl_path = evaluation.rewards.double(), evaluation.kl_path
        return {"reward": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
                "reward_se": float(r.std() / math.sqrt(r.numel())) if r.numel() > 1 else 0.0,
                "kl_path": float(kl_path.mean()), "beta": self.beta, "reward_name": self.cfg.options["reward"],
                "model": self.model}

    # ----- per-epoch hooks (engine/trainer.py) ---------------------------------------------------------------
    def on_iteration(self, trainer, batch) -> dict:
        """Image grid of this epoch's samples; rewards at other step counts every ``eval_every`` epochs (the
        discretisation-robustness protocol of chapter 12)."""
        opt, rec = self.cfg.options, {}
        it = trainer.iteration
        every = int(opt["eval_every"])
        if every > 0 and (it % every == 0 or it == trainer.cfg.iterations):
            for K in parse_steps(opt["eval_steps"]):
                ev = trainer.evaluate(n=int(opt["eval_n"]), grid=self.env.time_grid(K), seed=trainer.cfg.seed + 20_000)
                r = trainer._gather(ev.rewards).double()
                rec[f"eval_reward_K{K}"] = float(r.mean())
                rec[f"eval_reward_std_K{K}"] = float(r.std()) if r.numel() > 1 else 0.0
        img_every = int(opt["image_every"])
        if trainer.is_main and img_every > 0 and (it % img_every == 0 or it == trainer.cfg.iterations):
            self.save_images(batch.xs[-1], batch.rewards, trainer.out / "images" / f"epoch-{it:04d}.png")
        return rec

    def save_images(self, x: torch.Tensor, rewards: torch.Tensor, path: Path) -> Path:
        from .images import save_grid

        m = min(int(self.cfg.options["grid_images"]), x.shape[0])
        with torch.no_grad():
            imgs = self.env.decode(x[:m])
        scale = max(1, 128 // imgs.shape[-1])
        if imgs.shape[-1] > 256:                                  # keep per-epoch grids small
            imgs = torch.nn.functional.interpolate(imgs, size=(256, 256), mode="bilinear", antialias=True)
        return save_grid(imgs, path, ncol=min(m, 8), captions=[f"{float(r):.3g}" for r in rewards[:m]], scale=scale)

    def write_artifacts(self, out: Path, ev) -> None:
        self.save_images(ev.xs[-1], ev.rewards, Path(out) / "images" / "final.png")
        if self.cfg.options["export_lora"] and self.policy is not None:
            self.policy.export_lora(Path(out) / "lora")


def parse_steps(spec: str) -> list[int]:
    try:
        return [int(k) for k in str(spec).replace(" ", "").split(",") if k]
    except ValueError as e:
        raise ValueError(f"eval_steps must be comma-separated integers like 25,100; got {spec!r}") from e


def resolve_device(spec: str) -> tuple[torch.device, bool]:
    """The device of this process (accelerate's, so ``accelerate launch`` puts rank r on GPU r) and the cpu flag."""
    from accelerate import PartialState

    if spec not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {spec!r}")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False; use device=auto or cpu")
    cpu = spec == "cpu" or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "1", "true", "yes")
    return PartialState(cpu=cpu).device, cpu


def resolve_amp(spec: str, device: torch.device) -> str:
    if spec == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if spec not in ("no", "bf16", "fp16"):
        raise ValueError(f"amp must be auto, no, bf16 or fp16; got {spec!r}")
    if spec != "no" and device.type != "cuda":
        raise ValueError(f"amp={spec} needs CUDA; this process runs on {device}; use amp=no")
    return spec


def resolve_model(option: str, tiny: bool = False) -> str:
    """``--set model=...`` > $SACODE_SD_MODEL > the default (the tiny pipeline for sd-tiny presets, else the hub id)."""
    if option:
        return option
    if tiny:
        return "tiny"
    return os.environ.get(MODEL_ENV) or SD15_HUB_ID


@contextmanager
def _transformers_errors_only(quiet_loading: bool = False):
    """transformers' logger at error level: importing diffusers' pipelines (and loading one) resolves
    transformers' image processors, which without torchvision (not a dependency; the processors are not used) log a
    fallback notice. With ``quiet_loading``, no loading progress bars either (diffusers' and transformers')."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if quiet_loading:
        from diffusers.utils import logging as df_logging

        df_bars = df_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        df_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if quiet_loading:
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            (df_logging.enable_progress_bar if df_bars else df_logging.disable_progress_bar)()


def load_pipeline(model: str, allow_download: bool = False, torch_dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"):
    """A ``StableDiffusionPipeline`` from a folder or a hub id (``local_files_only`` unless allow_download), the
    tiny random pipeline for ``model="tiny"`` (built locally, sacode/envs/sd/tiny.py), or SD v1.5's architecture with
    random weights for ``model="sd15-random"`` (cost measurement only, sacode/envs/sd/sd15.py). No safety checker."""
    with _transformers_errors_only():   # importing diffusers' pipelines resolves transformers' image processors
        from diffusers import StableDiffusionPipeline

    if model == "sd15-random":              # SD v1.5's architecture, random weights: cost only (sd15.py)
        from .sd15 import build_sd15_random
        return build_sd15_random(device=device, dtype=torch_dtype)
    if model == "tiny":
        from .tiny import tiny_pipeline_path
        model = str(tiny_pipeline_path())
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        raise FileNotFoundError(f"{local} exists but is not a diffusers pipeline folder (no model_index.json)")
    try:
        with warnings.catch_warnings(), _transformers_errors_only(quiet_loading=True):
            # newer diffusers renamed torch_dtype to dtype; older ones need torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(str(local) if local.exists() else model,
                                                           torch_dtype=torch_dtype, local_files_only=not allow_download,
                                                           safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(MODEL_HELP.format(model=model, err=f"{type(e).__name__}: {str(e)[:200]}",
                                                  mirror=SD15_MIRROR, hub=SD15_HUB_ID, env=MODEL_ENV)) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class SDTinyTask(SDTask):
    """The same task on the tiny random pipeline built locally (CPU tests and the book)."""

    config_table = SD_TINY_CONFIG
    TINY = True
