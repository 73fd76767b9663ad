"""A diffusers ``StableDiffusionPipeline`` as an environment of the fine-tuning engine (chapter 12).

================================  ======================================================================
engine (theory)                   Stable Diffusion (diffusers)
================================  ======================================================================
state x at diffusion time s       latent (n, 4, H/8, W/8) at timestep tau, s = (tau + 1)/N (schedule.py)
forward SDE (alpha(s), sigma(s))  :class:`ScheduleSDE` from ``scheduler.alphas_cumprod``
condition c                       a prompt (str); embeddings from the frozen CLIP text encoder, cached
pretrained score s_pre(s, x, c)   -eps_guided / sigma(s) with the LoRA adapter *disabled* (same UNet)
policy mean (the action)          -eps_guided / sigma(s) with the adapter enabled (policy.py)
eps_guided                        eps_u + w (eps_c - eps_u): classifier-free guidance, scale w
sampler step                      sacode.dynamics.samplers.ddim_step on the scheduler's grid == DDIMScheduler.step
terminal reward r(x, c)           reward(VAE.decode(x / scaling_factor), prompt) (rewards.py)
================================  ======================================================================
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from ...dynamics.parameterisation import eps_to_score, v_to_eps
from ...dynamics.shapes import as_time
from ...theory.conditions import Conditions
from ...theory.control import ScoreControlProblem
from .prompts import PromptSampler
from .schedule import ScheduleSDE, check_scheduler, scheduler_grid


@contextmanager
def adapters_disabled(unet):
    """Run the UNet without its LoRA adapter (the pretrained model), restoring the adapter's requires_grad flags
    afterwards (peft's enable_adapters would otherwise leave them as it likes)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        yield
        return
    flags = [(p, p.requires_grad) for n, p in unet.named_parameters() if "lora_" in n]
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
        for p, f in flags:
            p.requires_grad_(f)


class SDEnv(ScoreControlProblem):
    """Text-to-image environment: latents as states, prompts as conditions, a reward on decoded images.

    Args:
        pipe: a ``StableDiffusionPipeline`` (any scheduler; it is replaced by a ``DDIMScheduler`` with the same config).
        reward_fn: ``reward(images, prompts) -> (n,)`` with images in [0, 1] (rewards.py).
        prompts: the prompt sampler of the conditions.
        guidance: classifier-free guidance scale w (1: no guidance, a single UNet pass).
        resolution: image side in pixels (a multiple of the VAE's downsampling factor).
        device, dtype: where latents live and their dtype (float32 on GPU; float64 in exactness tests).
        amp: ``no``, ``bf16`` or ``fp16``: autocast of UNet and VAE calls on CUDA (mixed precision).
        decode_batch: images decoded (and rewarded) per VAE call.
    """

    def __init__(self, pipe, reward_fn, prompts: PromptSampler, guidance: float = 7.0, resolution: int = 512,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, amp: str = "no",
                 decode_batch: int = 16):
        from diffusers import DDIMScheduler

        if not isinstance(pipe.scheduler, DDIMScheduler):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        check_scheduler(pipe.scheduler)
        self.pipe, self.scheduler = pipe, pipe.scheduler
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
        super().__init__(ScheduleSDE.from_scheduler(self.scheduler), None, reward_fn, 0.0, (), dtype)
        self.prompts = prompts
        self.reward_differentiable = bool(getattr(reward_fn, "differentiable", False))
        self.guidance = float(guidance)
        self.device, self.dtype = torch.device(device), dtype
        if amp not in ("no", "bf16", "fp16"):
            raise ValueError(f"amp must be no, bf16 or fp16; got {amp!r}")
        if amp != "no" and self.device.type != "cuda":
            raise ValueError(f"mixed precision ({amp}) is for CUDA; on {self.device.type} use amp=no")
        self.amp = amp
        self.prediction_type = self.scheduler.config.prediction_type
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
        self.resolution = int(resolution)
        self.event_shape = (self.unet.config.in_channels, resolution // factor, resolution // factor)
        self.decode_batch = int(decode_batch)
        self._emb: dict[str, Tensor] = {}
        self._uncond: Tensor | None = None

    # ----- conditions ----------------------------------------------------------------------------------------
    def sample_conditions(self, n: int, generator: torch.Generator) -> Conditions:
        return Conditions(self.prompts.sample(n, generator))

    @staticmethod
    def prompts_of(cond: Any, n: int) -> list[str]:
        """The n prompts of ``cond`` (Conditions holding prompts, a list of prompts, or one prompt for all)."""
        if isinstance(cond, Conditions):
            cond = cond.values
        if isinstance(cond, str):
            return [cond] * n
        if isinstance(cond, (list, tuple)) and len(cond) == n and all(isinstance(c, str) for c in cond):
            return list(cond)
        raise ValueError(f"Stable Diffusion conditions must be a list of {n} prompt strings; got {type(cond).__name__}")

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> Tensor:
        """CLIP text embeddings (n, L, D) of prompts, cached per prompt (pipe.encode_prompt, as the pipeline)."""
        new = sorted({p for p in prompts if p not in self._emb})
        if new or self._uncond is None:
            batch = new or [""]
            cond_emb, uncond_emb = self.pipe.encode_prompt(batch, self.device, 1, True)
            for p, e in zip(new, cond_emb):
                self._emb[p] = e
            self._uncond = uncond_emb[:1]
        return torch.stack([self._emb[p] for p in prompts])

    def pooled_embedding(self, prompts: list[str]) -> Tensor:
        """Mean over tokens of the prompt embedding, (n, D): the condition input of the value correction."""
        return self.embed(prompts).mean(1)

    # ----- the UNet as a score --------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp == "no":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def guided_eps(self, unet, s: Tensor, x: Tensor, cond: Any) -> Tensor:
        """eps_u + w (eps_c - eps_u) at timestep tau(s), in x's dtype; ``unet`` with or without its adapter."""
        n = x.shape[0]
        s = as_time(s, x)
        prompts = self.prompts_of(cond, n)
        emb = self.embed(prompts)
        tau = self.sde.timestep(s).to(device=x.device, dtype=torch.float32)
        wdtype = unet.dtype
        if self.guidance != 1.0:
            model_in, t_in = torch.cat([x, x]), torch.cat([tau, tau])
            emb = torch.cat([self._uncond.expand(n, -1, -1), emb])
        else:
            model_in, t_in = x, tau
        with self._autocast():
            out = unet(model_in.to(wdtype), t_in, encoder_hidden_states=emb.to(wdtype)).sample
        out = out.to(x.dtype)
        if self.guidance != 1.0:
            e_u, e_c = out.chunk(2)
            out = e_u + self.guidance * (e_c - e_u)
        if self.prediction_type == "v_prediction":
            out = v_to_eps(self.sde, s, x, out)
        return out

    def pretrained_score(self, s: Tensor, x: Tensor, cond: Any = None) -> Tensor:
        """s_pre(s, x, c) = -eps_guided / sigma(s) of the UNet with its LoRA adapter disabled (no second copy)."""
        s = as_time(s, x)
        with torch.no_grad(), adapters_disabled(self.unet):
            eps = self.guided_eps(self.unet, s, x, cond)
        return eps_to_score(self.sde, s, eps)

    # ----- initial law, grid, reward --------------------------------------------------------------------------
    def sample_init(self, n: int, generator: torch.Generator) -> Tensor:
        """x_0 ~ N(0, init_noise_sigma^2 I), drawn on the generator's device (as diffusers' randn_tensor)."""
        x = torch.randn((n, *self.event_shape), generator=generator, dtype=self.dtype, device=generator.device)
        return x.to(self.device) * self.scheduler.init_noise_sigma

    def time_grid(self, K: int):
        """The scheduler's own K-step DDIM grid (the engine's ``grid = native``)."""
        return scheduler_grid(self.scheduler, K, self.sde)

    def decode(self, x: Tensor) -> Tensor:
        """Images (n, 3, H, W) in [0, 1] (float32) decoded by the VAE, ``decode_batch`` latents at a time."""
        sf = self.vae.config.scaling_factor
        out = []
        for j in range(0, x.shape[0], self.decode_batch):
            z = (x[j: j + self.decode_batch] / sf).to(self.vae.dtype)
            with self._autocast():
                img = self.vae.decode(z).sample
            out.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    def reward(self, x: Tensor, cond: Any = None) -> Tensor:
        """r(x, c) = reward(decode(x), prompt), shape (n,), on x's device (with gradients only for a differentiable
        reward when gradients are enabled)."""
        prompts = self.prompts_of(cond, x.shape[0])
        grad = torch.is_grad_enabled() and self.reward_differentiable
        with torch.set_grad_enabled(grad):
            r = []
            for j in range(0, x.shape[0], self.decode_batch):
                r.append(torch.as_tensor(self.reward_fn(self.decode(x[j: j + self.decode_batch]),
                                                        prompts[j: j + self.decode_batch])))
            r = torch.cat(r)
        return r.to(device=x.device, dtype=x.dtype)

    def value_correction(self, hidden: int = 64, depth: int = 2) -> torch.nn.Module:
        """The learned branch V_phi(t, x, c) of the structured value network (value.py)."""
        from .value import LatentValueCorrection
        return LatentValueCorrection(self, width=hidden, depth=depth)
