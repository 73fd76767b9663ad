"""``python -m sacode bench sd-throughput``: the cost of the Stable Diffusion v1.5 run on this GPU, without weights.

Builds the full-size SD v1.5 architecture (UNet 860M parameters, cross-attention width 768; KL-VAE with factor 8;
CLIP ViT-L/14-sized text encoder) from its configuration with *random* weights (nothing is downloaded; the cost of a
forward/backward pass does not depend on the weight values), adds the LoRA adapter of the real run, and measures in
bf16 autocast:

* sampling: images/s of 50 DDIM steps with classifier-free guidance (policy only, as inference), and of the training
  rollout (policy and pretrained score at every step, as ctpo and ddpo record them);
* one training update of ctpo (value fit + PPO pass over every transition) and of ddpo (PPO pass), in seconds, with
  the per-GPU micro-batch of the ``full`` profile;
* peak GPU memory of each phase.

It refuses to run without CUDA. Profiles: ``ci`` (a tiny setting for the gpu test: 256 px, 4 steps, batch 2),
``class`` (512 px, 50 steps, batch 4), ``full`` (512 px, 50 steps, batch 8).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, norm_num_groups=32)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SETTINGS = {"ci": dict(resolution=256, K=4, batch=2), "class": dict(resolution=512, K=50, batch=4),
            "full": dict(resolution=512, K=50, batch=8)}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("sd-throughput measures GPU throughput and needs CUDA (torch.cuda.is_available() is False "
                         "here). Run it on a machine with an NVIDIA GPU: python -m sacode bench sd-throughput")


def build_sd15_random(device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A StableDiffusionPipeline with SD v1.5's architecture and random weights (byte-level tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..envs.sd.tiny import byte_clip_tokenizer

    tokenizer, vocab = byte_clip_tokenizer(77)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=vocab["<|startoftext|>"],
                                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def _timed_cuda(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def _timed_cpu(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, float("nan")


def measure(env, policy, K: int, n: int, algos: list[str], timed=_timed_cuda) -> dict:
    """Sampling throughput (policy only; training rollout with the pretrained score), and one ctpo / ddpo update
    with the sd15 ``full`` settings (micro-batches of 4), on ``env`` (any device; ``timed`` measures)."""
    from ..dynamics.samplers import reverse_sde_sample
    from ..dynamics.transition import Transition
    from ..engine.algos import make_algorithm
    from ..runs import make_config
    from ..theory.control import rollout

    rows: dict = {}
    grid = env.time_grid(K)
    stepper = Transition(env.sde, "ddim", 1.0)
    gen = torch.Generator(device=env.device).manual_seed(0)         # noise drawn where the latents live
    prompts = env.sample_conditions(n, gen)
    with torch.no_grad():
        rollout(env, policy, env.time_grid(2), stepper, n, gen)                          # warm-up
        _, t, mem = timed(lambda: reverse_sde_sample(env.sde, policy.score_fn(prompts), env.sample_init(n, gen), grid,
                                                     "ddim", 1.0, gen))
    rows["sample_images_per_s"], rows["sample_peak_GiB"] = n / t, mem
    batch, t, mem = timed(lambda: rollout(env, policy, grid, stepper, n, gen))
    rows["rollout_images_per_s"], rows["rollout_peak_GiB"] = n / t, mem
    for algo in algos:
        cfg = make_config("sd15-compressibility", algo, "full", 0,
                          {"K": K, "batch": n, "minibatch": n * K, "value_minibatch": 4 * n}).replace(beta=0.0)
        alg = make_algorithm(algo, env, policy, cfg, stepper)
        _, t, mem = timed(lambda: alg.update(batch, torch.Generator().manual_seed(1)))
        rows[f"{algo}_update_s"], rows[f"{algo}_update_peak_GiB"] = t, mem
        rows[f"{algo}_s_per_transition"] = t / (n * K)
    return rows


def sd_throughput(profile: str = "class", seeds: int = 1, presets=None, algos=None, cache: Path | None = None,
                  out: Path | None = None) -> dict:
    require_cuda()
    from ..envs.sd.env import SDEnv
    from ..envs.sd.policy import LoRAScorePolicy
    from ..envs.sd.prompts import PromptSampler
    from ..envs.sd.rewards import JpegCompressibility

    st = SETTINGS[profile]
    algos = algos or ["ctpo", "ddpo"]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    pipe = build_sd15_random()
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    env = SDEnv(pipe, JpegCompressibility(), PromptSampler.named("animals"), guidance=7.0,
                resolution=st["resolution"], device="cuda", dtype=torch.float32, amp="bf16", decode_batch=8)
    policy = LoRAScorePolicy(env, rank=4)
    n, K = st["batch"], st["K"]
    rows = {"device": torch.cuda.get_device_name(), "resolution": st["resolution"], "K": K, "batch": n,
            "amp": "bf16", "lora_rank": 4, "unet_params_M": unet_params / 1e6,
            "lora_params": sum(p.numel() for p in policy.lora_parameters())}
    rows |= measure(env, policy, K, n, algos)
    lines = [f"sd-throughput on {rows['device']} ({st['resolution']} px, {K} DDIM steps, CFG, batch {n}, bf16, "
             f"LoRA rank 4, random SD v1.5 weights)",
             f"  sampling (policy only)        {rows['sample_images_per_s']:8.3f} images/s   peak {rows['sample_peak_GiB']:.1f} GiB",
             f"  training rollout (+ s_pre)     {rows['rollout_images_per_s']:8.3f} images/s   peak {rows['rollout_peak_GiB']:.1f} GiB"]
    for algo in algos:
        lines.append(f"  {algo} update ({n} x {K} transitions) {rows[f'{algo}_update_s']:8.1f} s "
                     f"({rows[f'{algo}_s_per_transition'] * 1e3:.0f} ms/transition)   peak "
                     f"{rows[f'{algo}_update_peak_GiB']:.1f} GiB")
    return {"profile": profile, "results": rows, "table": "\n".join(lines)}
