"""Stable Diffusion v1.5 with LoRA on the fine-tuning engine (chapter 12).

* :mod:`sacode.envs.sd.schedule` — a diffusers scheduler as a linear SDE; timesteps <-> diffusion time (the one place).
* :mod:`sacode.envs.sd.env` — a ``StableDiffusionPipeline`` as an engine environment (latents, prompts, guided score).
* :mod:`sacode.envs.sd.policy` — the LoRA policy (peft), export to a standard diffusers LoRA.
* :mod:`sacode.envs.sd.rewards` — JPEG (in)compressibility, brightness, LAION aesthetic, ImageReward.
* :mod:`sacode.envs.sd.value` — the learned branch of the structured value network on latents.
* :mod:`sacode.envs.sd.task` — the presets ``sd15-*`` and ``sd-tiny-*`` of ``python -m sacode train``.
* :mod:`sacode.envs.sd.tiny` — a tiny random pipeline built locally (CPU tests and the book).
* :mod:`sacode.envs.sd.sd15` — SD v1.5's architecture with random weights (``model=sd15-random``): cost only.

Nothing here imports diffusers at package import time (it takes seconds); the modules import it when used.
"""
from ... import registry
from .task import SDTask, SDTinyTask

for _name, _task, _reward, _prompts, _what in [
        ("sd15-compressibility", SDTask, "compressibility", "animals", "SD v1.5 + LoRA, JPEG compressibility"),
        ("sd15-aesthetic", SDTask, "aesthetic", "animals", "SD v1.5 + LoRA, LAION aesthetic score"),
        ("sd15-imagereward", SDTask, "imagereward", "unicorn", "SD v1.5 + LoRA, ImageReward (the paper's prompt)"),
        ("sd-tiny-compressibility", SDTinyTask, "compressibility", "animals",
         "tiny random pipeline (CPU), JPEG compressibility"),
        ("sd-tiny-brightness", SDTinyTask, "brightness", "animals", "tiny random pipeline (CPU), image brightness")]:
    registry.register(registry.Preset(_name, "sd", _task, _what, config={"reward": _reward, "prompts": _prompts}))
