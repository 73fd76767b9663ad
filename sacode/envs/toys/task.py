"""The toy presets as a task of the engine: closed-form problems, an exact or DSM-trained pretrained score, and a
residual-MLP policy; summaries compare the terminal law with the closed-form optimum (chapter 5)."""
from __future__ import annotations

import dataclasses

import torch

from ...engine.config import ConfigTable, Param
from ...engine.policy import PerStepPolicy, ResidualMLPPolicy
from ...engine.task import Task
from ...engine.value import IMPROVED_VALUE_LEARNING
from ...engine.trainer import grid_end
from ...dynamics.grid import TimeGrid
from ...theory import optimal
from ...theory.control import Rollout
from ...theory.estimate import mean_se
from ...theory.presets import toy_preset
from .env import ToyEnv

TOY_CONFIG = ConfigTable(
    task=dict(IMPROVED_VALUE_LEARNING),   # chapter 7: keeps the value's input gradient along training
    profiles={
        "ci": dict(iterations=4, batch=64, eval_batch=512, checkpoint_every=2),
        "class": dict(iterations=60, batch=256, eval_batch=4096),
        "full": dict(iterations=300, batch=512, eval_batch=20000, checkpoint_every=25),
    },
)


class ToyTask(Task):
    """Task of the toy presets (``gauss1d-*``, ``mixture2d-linear``)."""

    config_table = TOY_CONFIG
    options = {"policy": Param("score", str, "policy network: score (a residual MLP of (t, x), one function of "
                               "continuous time) or per-step (a separate MLP of x per step of the uniform K-step "
                               "grid, no time input; other grids use the step that contains t; chapter 10)",
                               choices=("score", "per-step"))}

    def __init__(self, cfg, params=None):
        super().__init__(cfg, params)
        self.preset = toy_preset(cfg.preset)
        if cfg.beta is not None:                   # the KL weight is a knob (reward hacking as beta -> 0)
            self.preset = dataclasses.replace(self.preset, beta=float(cfg.beta))
        if cfg.pretrained == "exact":
            pretrained = "exact"
        elif cfg.pretrained == "mlp":
            from .pretrained import load_toy_score
            pretrained = load_toy_score(self.preset)
        else:
            raise ValueError(f"pretrained must be 'exact' or 'mlp' for the toy presets; got {cfg.pretrained!r}")
        self.env = ToyEnv(self.preset, pretrained)
        self.beta = self.preset.beta

    def make_policy(self, cfg) -> torch.nn.Module:
        if cfg.options.get("policy", "score") == "per-step":
            grid = TimeGrid.uniform(self.env.sde.T, cfg.K, grid_end(cfg, self.env.sde.T))
            return PerStepPolicy(self.env, grid.s, hidden=cfg.hidden, depth=cfg.depth)
        return ResidualMLPPolicy(self.env, hidden=cfg.hidden, depth=cfg.depth)

    def summary(self, evaluation: Rollout) -> dict:
        """Terminal-law statistics against the closed-form optimum (chapter 5)."""
        x, rewards, kl_path = evaluation.x, evaluation.rewards, evaluation.kl_path
        xf = x.reshape(x.shape[0], -1)
        mean, var = xf.mean(0), xf.var(0)
        law = optimal.optimal_terminal_law(self.preset)
        obj = optimal.optimal_objective(self.preset)
        J = mean_se(rewards - self.beta * kl_path)
        to_list = lambda v: [float(u) for u in torch.as_tensor(v).reshape(-1)]
        squeeze = (lambda v: to_list(v)[0]) if xf.shape[1] == 1 else to_list
        return {
            "terminal_mean": squeeze(mean), "terminal_var": squeeze(var),
            "target_mean": squeeze(law.mean), "target_var": squeeze(law.var),
            "objective": J.mean, "objective_se": J.se, "objective_opt": obj.J,
            "reward": float(rewards.mean()), "reward_opt": obj.expected_reward,
            "kl_path": float(kl_path.mean()), "kl_path_opt": obj.kl,
            "beta": self.beta,
        }
