"""Stable Diffusion v1.5 with LoRA on the fine-tuning engine (chapter 11).

* :mod:`sacode.sd.schedule` — a diffusers scheduler as a linear SDE; timesteps <-> diffusion time (the one place).
* :mod:`sacode.sd.env` — a ``StableDiffusionPipeline`` as an engine environment (latents, prompts, guided score).
* :mod:`sacode.sd.policy` — the LoRA policy (peft), export to a standard diffusers LoRA.
* :mod:`sacode.sd.rewards` — JPEG (in)compressibility, brightness, LAION aesthetic, ImageReward.
* :mod:`sacode.sd.value` — the learned branch of the structured value network on latents.
* :mod:`sacode.sd.task` — the presets ``sd15-*`` and ``sd-tiny-*`` of ``python -m sacode train``.
* :mod:`sacode.sd.tiny` — a tiny random pipeline built locally (CPU tests and the book).

Nothing here imports diffusers at package import time (it takes seconds); the modules import it when used.
"""
