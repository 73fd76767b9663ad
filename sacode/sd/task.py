"""Stable Diffusion presets of ``python -m sacode train`` (chapter 11).

=============================  ====================================================================================
``sd15-compressibility``       SD v1.5 + LoRA, JPEG compressibility, animal prompts (DDPO's first task)
``sd15-aesthetic``             SD v1.5 + LoRA, LAION aesthetic score, animal prompts
``sd15-imagereward``           SD v1.5 + LoRA, ImageReward, the paper's single unicorn prompt (theory-notes 3.1)
``sd-tiny-compressibility``    the same code on a tiny random pipeline built locally: runs on a laptop CPU
=============================  ====================================================================================

The ``full`` profile of the sd15 presets is the paper's per-GPU setting (50 DDIM steps with eta = 1, guidance 7,
LoRA rank 4, AdamW, 100 epochs; theory-notes 3.1 and 3.4); ``ci`` and ``class`` are short smoke runs. The model is
``--set model=PATH_OR_HUB_ID``, else ``$SACODE_SD_MODEL``, else the hub id ``runwayml/stable-diffusion-v1-5``, always
loaded with ``local_files_only`` unless ``--set allow_download=true``. Multi-GPU: ``accelerate launch -m sacode train
sd15-... --profile full`` (one process per GPU; batch sizes are per process).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

SD15_HUB_ID = "runwayml/stable-diffusion-v1-5"
SD15_MIRROR = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_ENV = "SACODE_SD_MODEL"

MODEL_HELP = (
    "Stable Diffusion weights for {model!r} are not available locally ({err}).\n"
    "Fetch them once on a machine with network, e.g.\n"
    "  python -c \"from diffusers import StableDiffusionPipeline as P; P.from_pretrained('{mirror}')\"\n"
    "(the {hub} repository may no longer resolve on the hub; {mirror} holds the same weights), then run with\n"
    "  --set model={mirror}   (found in the Hugging Face cache), or --set model=/path/to/folder, or set {env};\n"
    "or let this run download: --set allow_download=true.")

# options shared by every SD preset (set with --set key=value); model "" = $SACODE_SD_MODEL or the hub id
OPTIONS = dict(
    model="", allow_download=False, reward="compressibility", prompts="animals", guidance=7.0, resolution=512,
    lora_rank=4, lora_alpha=0.0, lora_targets="to_q,to_k,to_v,to_out.0", amp="auto", grad_checkpointing=False, dtype="float32", device="auto",
    decode_batch=16, image_every=1, grid_images=16, eval_steps="25,100", eval_every=10, eval_n=32,
    export_lora=True, aesthetic_mlp="", clip_model="", imagereward="",
)

# the paper's per-GPU settings (theory-notes 3.1 ctpo, 3.4 ddpo). ctpo: the paper samples 2 x 64 images per GPU and
# takes 2 optimiser steps per epoch over 100 epochs; here one iteration is one batch of 64 (same samples per optimiser
# step, same total: 200 x 64 = 100 x 128). Log-densities are summed over the d = 4*64*64 latent dimensions (DESIGN.md
# decision 6), so the paper's clip ranges on per-dimension mean log-densities become d * eps: for the small changes
# PPO allows, exp(d * dl) - 1 ~ d * dl (chapter 11).
LATENT_DIM_512 = 4 * 64 * 64
SD15_FULL = {
    "ctpo": dict(iterations=200, batch=64, lr=5e-5, weight_decay=1e-4, clip=LATENT_DIM_512 * 1.5e-5,
                 minibatch=64 * 50, micro_batch=4, adv_norm="step", value_lr=1e-4, value_epochs=1,
                 value_minibatch=100),
    "ddpo": dict(iterations=100, batch=64, lr=3e-5, weight_decay=1e-4, clip=LATENT_DIM_512 * 1e-5,
                 minibatch=32 * 50, micro_batch=4),
}
SD_COMMON = dict(method="ddim", eta=1.0, grid="native", K=50, adv_clip=5.0, max_grad_norm=1.0, value="structured",
                 hidden=64, depth=2)


def _algo_key(algo: str) -> str:
    return "ddpo" if algo == "ddpo" else "ctpo"


class SDTask:
    """A Stable Diffusion preset: loads the pipeline, builds the environment, the LoRA policy, and writes images,
    evaluations at other step counts and the exported LoRA."""

    PRESET: dict = {}
    TINY = False

    @classmethod
    def config_defaults(cls, profile: str, algo: str) -> dict:
        d = dict(SD_COMMON)
        opts = dict(OPTIONS) | cls.PRESET
        if cls.TINY:
            # a random network barely controls its images through attention alone (its only attention layers sit at
            # the 2x2 latent level), so the tiny presets also adapt conv_out; see chapter 11
            opts |= dict(model="tiny", resolution=32, guidance=3.0, decode_batch=64, grid_images=16, eval_every=1000,
                         eval_n=16, eval_steps="2,10,20", lora_targets="to_q,to_k,to_v,to_out.0,conv_out")
            d |= dict(lr=3e-2, value_lr=1e-3, clip=0.2, adv_norm="step", value_epochs=2, minibatch=160, K=5,
                      checkpoint_every=5)
            d |= {"ci": dict(iterations=2, batch=4, eval_batch=4, checkpoint_every=1),
                  "class": dict(iterations=10, batch=32, eval_batch=32),
                  "full": dict(iterations=40, batch=32, eval_batch=64)}[profile]
            if profile == "ci":
                opts |= dict(eval_every=0)
        else:
            d |= SD15_FULL[_algo_key(algo)]
            d |= {"ci": dict(iterations=1, batch=2, K=5, eval_batch=2, minibatch=10, micro_batch=2,
                             value_minibatch=10, checkpoint_every=1),
                  "class": dict(iterations=5, batch=16, K=50, eval_batch=16, minibatch=16 * 50, checkpoint_every=5),
                  "full": dict(eval_batch=64, checkpoint_every=10)}[profile]
            opts |= dict(eval_every=20 if profile == "full" else 0)      # every 20 x 64 = 1280 images per GPU
        return d | {"options": opts}

    def __init__(self, cfg):
        from .env import SDEnv
        from .prompts import PromptSampler
        from .rewards import make_reward

        self.cfg = o = cfg
        opt = cfg.options
        missing = set(OPTIONS) - set(opt)
        if missing:
            raise KeyError(f"Stable Diffusion options missing from the config: {sorted(missing)}; build the config "
                           f"with make_config({cfg.preset!r}, ...)")
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

    def summary(self, x: torch.Tensor, rewards: torch.Tensor, kl_path: torch.Tensor) -> dict:
        r = rewards.double()
        return {"reward": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
                "reward_se": float(r.std() / math.sqrt(r.numel())) if r.numel() > 1 else 0.0,
                "kl_path": float(kl_path.mean()), "beta": self.beta, "reward_name": self.cfg.options["reward"],
                "model": self.model}

    # ----- per-epoch hooks (engine/trainer.py) ---------------------------------------------------------------
    def on_iteration(self, trainer, batch) -> dict:
        """Image grid of this epoch's samples; rewards at other step counts every ``eval_every`` epochs (the
        discretisation-robustness protocol of theory-notes 3.5)."""
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


def load_pipeline(model: str, allow_download: bool = False, torch_dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"):
    """A ``StableDiffusionPipeline`` from a folder or a hub id (``local_files_only`` unless allow_download), or the
    tiny random pipeline for ``model="tiny"`` (built locally, sacode/sd/tiny.py). No safety checker."""
    from diffusers import StableDiffusionPipeline

    if model == "tiny":
        from .tiny import tiny_pipeline_path
        model = str(tiny_pipeline_path())
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        raise FileNotFoundError(f"{local} exists but is not a diffusers pipeline folder (no model_index.json)")
    try:
        with warnings.catch_warnings():       # newer diffusers renamed torch_dtype to dtype; older ones need torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(str(local) if local.exists() else model,
                                                           torch_dtype=torch_dtype, local_files_only=not allow_download,
                                                           safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(MODEL_HELP.format(model=model, err=f"{type(e).__name__}: {str(e)[:200]}",
                                                  mirror=SD15_MIRROR, hub=SD15_HUB_ID, env=MODEL_ENV)) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _preset(name: str, tiny: bool, **fixed) -> type:
    return type(f"SDTask_{name.replace('-', '_')}", (SDTask,), {"PRESET": fixed, "TINY": tiny})


SD_PRESETS: dict[str, type] = {
    "sd15-compressibility": _preset("sd15-compressibility", False, reward="compressibility", prompts="animals"),
    "sd15-aesthetic": _preset("sd15-aesthetic", False, reward="aesthetic", prompts="animals"),
    "sd15-imagereward": _preset("sd15-imagereward", False, reward="imagereward", prompts="unicorn"),
    "sd-tiny-compressibility": _preset("sd-tiny-compressibility", True, reward="compressibility", prompts="animals"),
    "sd-tiny-brightness": _preset("sd-tiny-brightness", True, reward="brightness", prompts="animals"),
}
