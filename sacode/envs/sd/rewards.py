"""Image rewards with the protocol ``reward(images, prompts) -> tensor (n,)``; images (n, 3, H, W) in [0, 1].

=====================  ==========================================================================================
``compressibility``    minus the JPEG size in kB at quality 95 (DDPO's ``jpeg_compressibility``); no weights
``incompressibility``  plus the JPEG size in kB; no weights
``brightness``         the mean pixel value in [0, 1]; differentiable; a transparent reward for the tiny CPU model
``aesthetic``          the LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding
                       (weights from user-given paths)
``imagereward``        ImageReward v1.0 (Xu et al. 2023) through the optional ``image-reward`` package
=====================  ==========================================================================================

Rewards that need weights never download them: they take local paths and raise :class:`MissingRewardWeights`
naming the missing file or package and the command that fetches it on a machine with network.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from .images import to_pil, to_uint8


class MissingRewardWeights(FileNotFoundError):
    """A reward model's package or weight file is not available locally (the message says how to get it)."""


class ImageRewardFn(Protocol):
    name: str
    differentiable: bool

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


# ------------------------------------------------------------------------------------------------------------------
# weight-free rewards
# ------------------------------------------------------------------------------------------------------------------
def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG by PIL at ``quality`` (float64, on the CPU)."""
    from PIL import Image

    sizes = []
    for a in to_uint8(images).numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float64)


class JpegCompressibility:
    """r = -(JPEG size in kB): rewards images that compress well (smooth, few details)."""

    name, differentiable = "compressibility", False

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return -jpeg_size_kb(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """r = +(JPEG size in kB): rewards detailed, high-frequency images."""

    name = "incompressibility"

    def __call__(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return jpeg_size_kb(images, self.quality)


class Brightness:
    """r = mean pixel value in [0, 1] (differentiable)."""

    name, differentiable = "brightness", True

    def __call__(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return images.clamp(0, 1).reshape(images.shape[0], -1).mean(1)


# ------------------------------------------------------------------------------------------------------------------
# CLIP-based aesthetic predictor
# ------------------------------------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """CLIP's preprocessing in torch (differentiable): bicubic resize of the short side to ``size``, centre crop,
    normalisation with CLIP's mean and std. images (n, 3, H, W) in [0, 1]."""
    n, c, h, w = images.shape
    k = size / min(h, w)
    nh, nw = max(size, round(h * k)), max(size, round(w * k))
    x = nn.functional.interpolate(images.float(), size=(nh, nw), mode="bicubic", align_corners=False,
                                  antialias=nh < h)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top: top + size, left: left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (Linear layers with dropout, no activations)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb)


AESTHETIC_HELP = (
    "The aesthetic reward needs two local files/folders:\n"
    "  1. the MLP weights sac+logos+ava1-l14-linearMSE.pth (set aesthetic_mlp=PATH); on a machine with network:\n"
    "     wget https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth\n"
    "  2. CLIP ViT-L/14 in transformers format (set clip_model=PATH or a hub id already in the local cache):\n"
    "     hf download openai/clip-vit-large-patch14")


class AestheticReward(nn.Module):
    """LAION aesthetic score: MLP(CLIP image embedding / ||.||), as in DDPO's aesthetic reward. Differentiable."""

    name, differentiable = "aesthetic", True

    def __init__(self, mlp_path: str | os.PathLike, clip_model: str | os.PathLike = "openai/clip-vit-large-patch14",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        mlp_path = Path(mlp_path).expanduser() if mlp_path else None
        if mlp_path is None or not mlp_path.is_file():
            raise MissingRewardWeights(f"aesthetic MLP weights not found at {str(mlp_path)!r}.\n{AESTHETIC_HELP}")
        try:
            from transformers import CLIPVisionModelWithProjection
            self.clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_model), local_files_only=True)
        except (OSError, ValueError) as e:
            raise MissingRewardWeights(f"CLIP model {str(clip_model)!r} not found locally ({type(e).__name__}).\n"
                                       f"{AESTHETIC_HELP}") from e
        state = torch.load(mlp_path, map_location="cpu", weights_only=True)
        if "layers.0.weight" not in state:
            raise ValueError(f"{mlp_path} is not an improved-aesthetic-predictor state dict (no 'layers.0.weight')")
        in_dim = state["layers.0.weight"].shape[1]
        if in_dim != self.clip.config.projection_dim:
            raise ValueError(f"the aesthetic MLP expects {in_dim}-dim embeddings but {clip_model} projects to "
                             f"{self.clip.config.projection_dim}; use CLIP ViT-L/14 (768) with the LAION MLP")
        self.mlp = AestheticMLP(in_dim)
        self.mlp.load_state_dict(state)
        self.size = self.clip.config.image_size
        self.requires_grad_(False)
        self.eval().to(device=device, dtype=dtype)

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        dtype = next(self.parameters()).dtype
        pix = clip_preprocess(images, self.size).to(dtype)
        emb = self.clip(pixel_values=pix).image_embeds
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(1).float()


# ------------------------------------------------------------------------------------------------------------------
# ImageReward (optional package)
# ------------------------------------------------------------------------------------------------------------------
IMAGEREWARD_HELP = (
    "ImageReward needs the optional package and three downloads, none of which this project installs:\n"
    "  pip install image-reward            # also needs torchvision matching your torch\n"
    "  python -c \"import ImageReward as RM; RM.load('ImageReward-v1.0', download_root='~/.cache/ImageReward')\"\n"
    "The second command fetches ImageReward.pt and med_config.json into ~/.cache/ImageReward and the\n"
    "bert-base-uncased tokenizer into the Hugging Face cache; then set imagereward=~/.cache/ImageReward (the folder).")


class ImageRewardScore:
    """ImageReward v1.0 (BLIP + MLP, standardised), scored with the package's own preprocessing. Not differentiable
    here (the package works on PIL images)."""

    name, differentiable = "imagereward", False

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        try:
            from ImageReward.ImageReward import ImageReward as _IRModel
        except ImportError as e:
            raise MissingRewardWeights(f"the image-reward package cannot be imported ({e}).\n{IMAGEREWARD_HELP}") from e
        folder = Path(folder or "~/.cache/ImageReward").expanduser()
        ckpt, med = folder / "ImageReward.pt", folder / "med_config.json"
        for f in (ckpt, med):
            if not f.is_file():
                raise MissingRewardWeights(f"ImageReward file {f} not found.\n{IMAGEREWARD_HELP}")
        try:
            model = _IRModel(device=device, med_config=str(med))
        except OSError as e:                     # BLIP's tokenizer: bert-base-uncased not in the HF cache
            raise MissingRewardWeights(f"ImageReward could not build its BLIP tokenizer ({e}).\n{IMAGEREWARD_HELP}") from e
        model.load_state_dict(torch.load(ckpt, map_location="cpu"), strict=False)
        self.model = model.to(device).eval()

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        pils = to_pil(images)
        out = torch.empty(len(pils), dtype=torch.float64)
        for p in set(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            scores = self.model.score(p, [pils[i] for i in idx])
            scores = scores if isinstance(scores, list) else [scores]
            out[idx] = torch.tensor(scores, dtype=torch.float64)
        return out


# ------------------------------------------------------------------------------------------------------------------
REWARDS = ("compressibility", "incompressibility", "brightness", "aesthetic", "imagereward")


def make_reward(name: str, options: dict | None = None, device: str | torch.device = "cpu") -> ImageRewardFn:
    """Build a reward by name; weight paths come from ``options`` (``aesthetic_mlp``, ``clip_model``, ``imagereward``)
    or the environment variables SACODE_AESTHETIC_MLP, SACODE_CLIP_MODEL, SACODE_IMAGEREWARD."""
    o = options or {}
    if name == "compressibility":
        return JpegCompressibility()
    if name == "incompressibility":
        return JpegIncompressibility()
    if name == "brightness":
        return Brightness()
    if name == "aesthetic":
        return AestheticReward(o.get("aesthetic_mlp") or os.environ.get("SACODE_AESTHETIC_MLP", ""),
                               o.get("clip_model") or os.environ.get("SACODE_CLIP_MODEL", "openai/clip-vit-large-patch14"),
                               device=device)
    if name == "imagereward":
        return ImageRewardScore(o.get("imagereward") or os.environ.get("SACODE_IMAGEREWARD", "~/.cache/ImageReward"),
                                device=device)
    raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
