"""The Stable Diffusion policy: a LoRA adapter on the UNet's attention projections (peft), as a score s_theta.

s_theta(s, x, c) = -eps_guided^theta(x, tau(s), c) / sigma(s): the same guided eps as the pretrained score, with the
adapter enabled. The adapter's B matrices start at zero, so at initialisation the policy *is* the pretrained model
(the KL to it is zero), which is what fine-tuning needs. Only the LoRA matrices are trainable; the UNet, VAE and text
encoder stay frozen, and the pretrained score reuses the same UNet with the adapter disabled (no second copy).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...dynamics.shapes import as_time
from ...engine.files import atomic_write_bytes
from ...engine.policy import ScorePolicy
from ...dynamics.parameterisation import eps_to_score

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRAScorePolicy(ScorePolicy):
    """LoRA(rank, alpha) on ``target_modules`` of ``env.unet``; forward(s, x, prompts) -> score.

    Args:
        env: an :class:`sacode.envs.sd.env.SDEnv` (its UNet receives the adapter).
        rank, alpha: LoRA rank r and scale alpha (the update is (alpha / r) B A; alpha defaults to r).
        target_modules: the attention projections that get adapters (diffusers' and DDPO's choice by default).
        grad_checkpointing: recompute UNet activations in the backward pass (less memory, about 30% more time).
    """

    def __init__(self, env, rank: int = 4, alpha: float | None = None, target_modules=LORA_TARGETS,
                 grad_checkpointing: bool = False):
        super().__init__()
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}")
        self.env = env
        self.unet = env.unet
        self.lora_config = LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), init_lora_weights="gaussian",
                                      target_modules=list(target_modules))
        self.unet.add_adapter(self.lora_config)
        # trainable LoRA matrices in float32 (float64 in float64 runs) even when the frozen UNet is bf16/fp16
        cast_training_params(self.unet, dtype=torch.float64 if env.dtype == torch.float64 else torch.float32)
        if grad_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.named_parameters() if "lora_" in n]

    def forward(self, s: Tensor, x: Tensor, cond: Any = None) -> Tensor:
        s = as_time(s, x)
        return eps_to_score(self.env.sde, s, self.env.guided_eps(self.unet, s, x, cond))

    # ----- checkpoints: the LoRA matrices only (not the 860M frozen UNet weights) -----------------------------
    def checkpoint_state(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if "lora_" in n}

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        params = {n: p for n, p in self.named_parameters() if "lora_" in n}
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise ValueError(f"LoRA checkpoint does not match the policy (rank or targets changed?): "
                             f"{len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                             f"{sorted(missing or unexpected)[:2]}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p))

    # ----- export as a standard diffusers LoRA ---------------------------------------------------------------
    def export_lora(self, directory: str | os.PathLike) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``StableDiffusionPipeline.load_lora_weights(directory)``
        loads (the rank and alpha travel as adapter metadata)."""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        directory = Path(directory)
        # peft's key format (lora_A / lora_B), which load_lora_weights reads for linear and conv layers alike
        # (diffusers' convert_state_dict_to_diffusers renames only the linear ones, which breaks conv_out)
        layers = get_peft_model_state_dict(self.unet)
        layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
        # sets (target_modules) as sorted lists: the file is byte-for-byte reproducible (a set's order is not)
        meta = sorted_metadata(self.unet.peft_config["default"].to_dict())
        name = "pytorch_lora_weights.safetensors"
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory))
        try:                         # diffusers writes into a scratch folder; the file then replaces the old atomically
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True,
                                                      unet_lora_adapter_metadata=meta)
            atomic_write_bytes(directory / name, canonical_safetensors((tmp / name).read_bytes()))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory / name


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file with its JSON header in a fixed order (metadata, then tensors, keys sorted). The writer
    keeps the header in a hash map whose order changes from process to process; the tensor bytes are unchanged (the
    header's offsets are relative to the data section), so any safetensors reader reads the same tensors."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                         # the data section stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def sorted_metadata(value: Any) -> Any:
    """``value`` with every set replaced by a sorted list, recursively (JSON metadata with a fixed order)."""
    if isinstance(value, (set, frozenset)):
        return sorted((sorted_metadata(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k: sorted_metadata(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sorted_metadata(v) for v in value]
    return value
