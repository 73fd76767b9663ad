"""Tasks: how a preset name becomes an environment, a policy and a summary.

Every preset family registers a builder here; the trainer itself knows nothing about toys, digits or
Stable Diffusion.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..presets import TOY_PRESETS, toy_preset
from .env import ToyEnv
from .policy import ResidualMLPPolicy


class ToyTask:
    """The toy presets of DESIGN.md: exact or DSM-trained pretrained score, residual-MLP policy."""

    def __init__(self, cfg):
        self.preset = toy_preset(cfg.preset)
        if cfg.beta is not None:                   # the KL weight is a knob (reward hacking as beta -> 0)
            self.preset = dataclasses.replace(self.preset, beta=float(cfg.beta))
        if cfg.pretrained == "exact":
            pretrained = "exact"
        elif cfg.pretrained == "mlp":
            from ..pretrained_toys import load_toy_score
            pretrained = load_toy_score(self.preset)
        else:
            raise ValueError(f"pretrained must be 'exact' or 'mlp'; got {cfg.pretrained!r}")
        self.env = ToyEnv(self.preset, pretrained)
        self.beta = self.preset.beta

    def make_policy(self, cfg) -> torch.nn.Module:
        return ResidualMLPPolicy(self.env, hidden=cfg.hidden, depth=cfg.depth)

    def summary(self, x: torch.Tensor, rewards: torch.Tensor, kl_path: torch.Tensor) -> dict:
        """Terminal-law statistics against the closed-form optimum (chapter 5)."""
        from .. import optimal

        xf = x.reshape(x.shape[0], -1)
        mean, var = xf.mean(0), xf.var(0)
        law = optimal.optimal_terminal_law(self.preset)
        obj = optimal.optimal_objective(self.preset)
        to_list = lambda v: [float(u) for u in torch.as_tensor(v).reshape(-1)]
        squeeze = (lambda v: to_list(v)[0]) if xf.shape[1] == 1 else to_list
        return {
            "terminal_mean": squeeze(mean), "terminal_var": squeeze(var),
            "target_mean": squeeze(law.mean), "target_var": squeeze(law.var),
            "objective": float((rewards - self.beta * kl_path).mean()),
            "objective_se": float((rewards - self.beta * kl_path).std() / rewards.numel() ** 0.5),
            "objective_opt": obj.J,
            "reward": float(rewards.mean()), "reward_opt": obj.expected_reward,
            "kl_path": float(kl_path.mean()), "kl_path_opt": obj.kl,
            "beta": self.beta,
        }


TASKS: dict[str, Callable] = {name: ToyTask for name in TOY_PRESETS}
from ..digits.task import DIGITS_PRESETS, DigitsTask  # noqa: E402  (chapter 10: 8x8 digits)
TASKS.update(dict.fromkeys(DIGITS_PRESETS, DigitsTask))
from ..sd.task import SD_PRESETS  # noqa: E402  (chapter 11: Stable Diffusion + LoRA; diffusers imported lazily)
TASKS.update(SD_PRESETS)


def make_task(cfg):
    if cfg.preset not in TASKS:
        raise KeyError(f"unknown preset {cfg.preset!r}; available: {', '.join(TASKS)}")
    return TASKS[cfg.preset](cfg)
