"""A tiny, randomly initialised Stable Diffusion pipeline built locally (no download), for CPU tests and the book.

It has Stable Diffusion's *architecture* in miniature: a CLIP text encoder (2 layers, width 32) with a merge-free
byte-level CLIP tokenizer (514 tokens), a conditional UNet with cross-attention (985k parameters), a KL-VAE with
Stable Diffusion's downsampling factor 8 and 4 latent channels, and SD v1.5's DDIM scheduler settings
(scaled-linear betas 0.00085 -> 0.012, 1000 steps, ``set_alpha_to_one=False``, ``steps_offset=1``). Its weights are
random (seeded), so its images are noise-like: it exercises every code path of the real run, not image quality.
The pipeline is saved with ``save_pretrained`` and always loaded back through ``from_pretrained``, the same path as
the real weights.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = 3


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (the base alphabet of CLIP's byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_clip_tokenizer(max_length: int = 16):
    """A merge-free byte-level CLIP tokenizer (514 tokens: 256 bytes, their end-of-word forms, 2 specials); no
    vocabulary download. Returns (tokenizer, vocab)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length), vocab


def build_tiny_pipeline(seed: int = 0, max_length: int = 16, prediction_type: str = "v_prediction"):
    """A freshly built tiny ``StableDiffusionPipeline`` with seeded random weights (not saved)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = byte_clip_tokenizer(max_length)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=max_length, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=1, block_out_channels=(8, 16, 32, 32),
            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def tiny_pipeline_path(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build (once) and save the tiny pipeline; return its directory.

    The default cache is ``$SACODE_CACHE`` or the system temp dir. The directory is written atomically (built in a
    sibling temp dir, then renamed), so parallel processes can call this at the same time.
    """
    root = Path(cache_dir or os.environ.get("SACODE_CACHE") or tempfile.gettempdir())
    path = root / f"sacode-sd-tiny-v{TINY_VERSION}-seed{seed}"
    if (path / "model_index.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=root))
    try:
        build_tiny_pipeline(seed).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:            # another process won the race
            if not (path / "model_index.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
