"""Stable Diffusion v1.5's architecture with random weights, built offline: for measuring cost only (chapter 12).

The time, memory and FLOPs of a network do not depend on the values of its weights, so a pipeline with SD v1.5's
exact architecture and random weights costs what the real one costs. Its configurations are shipped as small JSON
files in ``configs/`` (facts about the architecture, not weights):

=========================  ==================================================================================
``sd15_unet.json``         the conditional UNet, 859.5 M parameters, cross-attention width 768, 64 x 64 latents
``sd15_vae.json``          the KL-VAE: 4 latent channels, downsampling factor 8, scaling factor 0.18215
``sd15_text_encoder.json`` the text tower of CLIP ViT-L/14: 12 layers, width 768, 77 positions, quick-GELU
``sd15_scheduler.json``    the noise schedule (scaled-linear betas 0.00085 -> 0.012, 1000 steps)
``clip_vit_l14_vision.json`` the image tower of CLIP ViT-L/14 (the LAION aesthetic reward), for its FLOPs
=========================  ==================================================================================

The tokenizer is the merge-free byte-level CLIP tokenizer of :mod:`sacode.envs.sd.tiny` padded to 77 tokens (the
token count is what matters for cost). ``--set model=sd15-random`` selects this pipeline for ``train`` and
``bench``; it warns when built, because its images are noise and its rewards meaningless.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

SD15_RANDOM = "sd15-random"
CONFIG_DIR = Path(__file__).resolve().with_name("configs")
CONFIG_FILES = {"unet": "sd15_unet.json", "vae": "sd15_vae.json", "text_encoder": "sd15_text_encoder.json",
                "scheduler": "sd15_scheduler.json", "clip_vision": "clip_vit_l14_vision.json"}
# published parameter counts of SD v1.5 (its unet, vae and text_encoder), which the configurations must reproduce
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
TOKENS = 77
COST_ONLY = ("model=sd15-random: Stable Diffusion v1.5's architecture with RANDOM weights, built offline. It is for "
             "measuring time, memory and FLOPs only: its images are noise and its rewards meaningless.")


class CostOnlyModelWarning(UserWarning):
    """Emitted when the random-weight SD v1.5 pipeline is built (it measures cost, not quality)."""


def sd15_config(part: str) -> dict:
    """The configuration ``part`` (unet, vae, text_encoder, scheduler, clip_vision) without its ``_`` keys."""
    if part not in CONFIG_FILES:
        raise ValueError(f"unknown configuration {part!r}; choose one of {', '.join(CONFIG_FILES)}")
    raw = json.loads((CONFIG_DIR / CONFIG_FILES[part]).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def sd15_modules(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """The UNet, VAE and text encoder of SD v1.5 with random (seeded, PyTorch-default) weights, in eval mode like
    ``from_pretrained``. ``device="meta"`` builds them without memory or time (for counting FLOPs and bytes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import byte_clip_tokenizer

    _, vocab = byte_clip_tokenizer(TOKENS)
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"])
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**sd15_config("unet"))
            vae = AutoencoderKL(**sd15_config("vae"))
            text = CLIPTextModel(CLIPTextConfig(**sd15_config("text_encoder"), **ids))
    mods = {"unet": unet, "vae": vae, "text_encoder": text}
    for m in mods.values():
        m.eval()
        torch.nn.Module.to(m, dtype=dtype)        # (diffusers' own .to warns about dtype casts of loaded models)
    return mods


def build_sd15_random(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                      warn: bool = True):
    """A ``StableDiffusionPipeline`` with SD v1.5's architecture and random weights (nothing is downloaded).

    Building the 860 M-parameter UNet takes about 10 s on a laptop CPU and a second on a GPU (the weights are drawn
    where they live)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .tiny import byte_clip_tokenizer

    if warn:
        warnings.warn(COST_ONLY, CostOnlyModelWarning, stacklevel=2)
    mods = sd15_modules(device, dtype, seed)
    tokenizer, _ = byte_clip_tokenizer(TOKENS)
    pipe = StableDiffusionPipeline(vae=mods["vae"], text_encoder=mods["text_encoder"], tokenizer=tokenizer,
                                   unet=mods["unet"], scheduler=DDIMScheduler(**sd15_config("scheduler")),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(modules: dict) -> dict[str, int]:
    """Number of parameters of each module of ``modules`` (name -> module)."""
    return {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
