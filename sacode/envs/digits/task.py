"""The digits environment, policy and presets of the fine-tuning engine (chapter 11).

Environment: the VP SDE of the pretrained UNet, initial law N(0, I), no conditions (the target digit is part of the
preset), the committed UNet as s_pre (memoised, :mod:`.score_cache`) and one of the rewards of :mod:`.rewards`.

Policy: s_theta(s, x) = s_pre(s, x) + c_theta(s, x) with a small time-embedded MLP correction c_theta whose input is
the noisy image x and the pretrained model's denoised guess x0_hat(s, x) (Tweedie, clipped to [-1, 1]); its last
layer starts at zero, so the policy starts as the pretrained sampler. Why not fine-tune (part of) the UNet? On a
laptop CPU the UNet forward pass dominates everything: a residual on top of a frozen UNet needs one UNet pass per
transition for the whole iteration (rollout, KL reference, PPO epochs and value targets share it through the
cache), while a trainable UNet needs a fresh forward and backward pass in every PPO epoch. The MLP costs about
1/20 of a UNet pass, and x0_hat gives it the pretrained model's picture of the final digit for free.

Presets (``python -m sacode train PRESET``):

=================  =========================================  ====  =========================================
preset             reward                                     beta  optimum (beta tilt of the pretrained law)
=================  =========================================  ====  =========================================
digits-class3      log p(y = 3 | x)                           1.0   the pretrained model's class-3 conditional
digits-ink         number of inked pixels (0..64)             1.0   heavier strokes
digits-jpeg        -(JPEG size of the 32x32 image, kB)        0.01  simpler, smoother digits (not differentiable)
=================  =========================================  ====  =========================================
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ...dynamics.parameterisation import tweedie
from ...dynamics.shapes import as_time
from ...engine.config import ConfigTable
from ...engine.nets import MLP
from ...engine.policy import FixedScorePolicy, ScorePolicy
from ...engine.task import Task
from ...engine.trainer import evaluation_grid
from ...theory.conditions import Conditions
from ...theory.control import Rollout, ScoreControlProblem, rollout
from ...theory.estimate import mean_se
from .data import SHAPE
from .pretrain import digits_sde, load_classifier, load_score_model
from .rewards import ClassLogProb, JPEGCompressibility, TotalInk
from .score_cache import FrozenScoreCache


@dataclass(frozen=True)
class DigitsPreset:
    name: str
    reward: str           # class | ink | jpeg
    beta: float
    target: int | None = None


DIGITS_PRESETS: dict[str, DigitsPreset] = {p.name: p for p in [
    DigitsPreset("digits-class3", "class", 1.0, 3),
    DigitsPreset("digits-ink", "ink", 1.0),
    DigitsPreset("digits-jpeg", "jpeg", 0.01),
]}

DIGITS_CONFIG = ConfigTable(
    task=dict(method="ddim", eta=1.0, hidden=256, depth=2, minibatch=256, inner_epochs=2, value="structured",
              pretrained="unet"),
    algos={"ctpo": dict(lr=1e-3), "ctpo-pathwise": dict(lr=3e-4), "ddpo": dict(lr=1e-3), "dpok": dict(lr=1e-3),
           "backprop": dict(lr=1e-3, bp_steps=3)},
    profiles={"ci": dict(iterations=2, batch=16, eval_batch=64, K=5, checkpoint_every=2),
              "class": dict(iterations=30, batch=128, eval_batch=512, K=10, checkpoint_every=10),
              "full": dict(iterations=200, batch=256, eval_batch=1000, K=20, checkpoint_every=25)},
)


def digits_reward(preset: DigitsPreset):
    """The reward of a digits preset (a classifier log-probability, ink, or JPEG compressibility)."""
    if preset.reward == "class":
        return ClassLogProb(load_classifier(), preset.target)
    if preset.reward == "ink":
        return TotalInk()
    if preset.reward == "jpeg":
        return JPEGCompressibility()
    raise ValueError(f"unknown digits reward {preset.reward!r}; use class, ink or jpeg")


class DigitsEnv(ScoreControlProblem):
    """The 8x8 digits as an engine environment (float32): the committed UNet as s_pre (memoised), initial law
    N(0, I), no conditions."""

    def __init__(self, preset: DigitsPreset, score_model: nn.Module | None = None, reward=None):
        self.score_model = score_model or load_score_model()
        self._cached = FrozenScoreCache(self.score_model)
        reward = reward or digits_reward(preset)
        super().__init__(digits_sde(), None, reward, preset.beta, SHAPE, torch.float32)
        self.preset = preset
        self.reward_differentiable = bool(self.reward_fn.differentiable)

    def pretrained_score(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        return self._cached(as_time(s, x), x)

    def reward(self, x: Tensor, cond: Conditions | None = None) -> Tensor:
        return self.reward_fn(x, cond)


class DigitsResidualPolicy(ScorePolicy):
    """s_theta(s, x) = s_pre(s, x) + c_theta(s/T, [x, clip(x0_hat_pre(s, x))]), c_theta zero at initialisation."""

    def __init__(self, env, hidden: int = 256, depth: int = 2, n_freq: int = 8):
        super().__init__()
        self.env = env
        self.d = math.prod(env.event_shape)
        self.net = MLP(2 * self.d, self.d, hidden, depth, n_freq)
        nn.init.zeros_(self.net.net[-1].weight)
        nn.init.zeros_(self.net.net[-1].bias)

    def correction(self, s: Tensor, x: Tensor, pre: Tensor) -> Tensor:
        x0 = tweedie(self.env.sde, s, x, pre).clamp(-1.0, 1.0)
        inp = torch.cat([x.reshape(x.shape[0], -1), x0.reshape(x.shape[0], -1)], dim=1).float()
        return self.net((s / self.env.sde.T).float(), inp).reshape(x.shape).to(x.dtype)

    def forward(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        s = as_time(s, x)
        pre = self.env.pretrained_score(s, x, cond)
        return pre + self.correction(s, x, pre)


class DigitsTask(Task):
    """Task of the engine for the ``digits-*`` presets (see the module docstring)."""

    config_table = DIGITS_CONFIG

    def __init__(self, cfg, params=None):
        super().__init__(cfg, params)
        if cfg.preset not in DIGITS_PRESETS:
            raise KeyError(f"unknown digits preset {cfg.preset!r}; available: {', '.join(DIGITS_PRESETS)}")
        if cfg.pretrained not in ("unet", "exact"):
            raise ValueError(f"the digits presets use the committed UNet (pretrained=unet); got {cfg.pretrained!r}")
        self.cfg = cfg
        self.preset = DIGITS_PRESETS[cfg.preset]
        if cfg.beta is not None:
            self.preset = dataclasses.replace(self.preset, beta=float(cfg.beta))
        self.env = DigitsEnv(self.preset)
        self.beta = self.preset.beta
        self._pre_eval = None

    def make_policy(self, cfg) -> torch.nn.Module:
        return DigitsResidualPolicy(self.env, hidden=cfg.hidden, depth=cfg.depth)

    # ----- evaluation ---------------------------------------------------------------------------
    def pretrained_rollout(self, n: int, grid, transition, seed: int) -> Rollout:
        """The pretrained sampler on the evaluation's grid and noise (common random numbers with Trainer.evaluate)."""
        return rollout(self.env, FixedScorePolicy.pretrained(self.env), grid, transition, n,
                       torch.Generator().manual_seed(seed))

    def image_metrics(self, x: Tensor) -> dict:
        """Sample quality and diversity of images x (see :func:`sacode.envs.digits.quality.image_metrics`)."""
        from .quality import image_metrics

        return image_metrics(load_classifier(), x, self.preset.target)

    def iteration_metrics(self, batch) -> dict:
        """Logged every iteration by the trainer (on the iteration's own samples, n = batch size)."""
        m = self.image_metrics(batch.xs[-1])
        m.pop("class_histogram")
        return {"fd_batch": m.pop("sample_quality")} | m

    def summary(self, evaluation: Rollout) -> dict:
        from ...dynamics.transition import Transition

        cfg, x, rewards, kl_path = self.cfg, evaluation.x, evaluation.rewards, evaluation.kl_path
        n = x.shape[0]
        pre = self.pretrained_rollout(n, evaluation_grid(cfg, self.env),
                                      Transition(self.env.sde, cfg.method, cfg.eta, cfg.explore), cfg.seed + 10_000)
        self._pre_eval, self._final_x = pre.xs[-1], x
        se = lambda v: mean_se(v).se
        r_pre, beta = pre.rewards.double(), self.beta
        obj = rewards.double() - beta * kl_path.double()
        # J* = beta log E_pre[exp(r / beta)] over path measures with the initial law fixed (Donsker-Varadhan):
        # no policy on this grid can exceed it (chapter 5); estimated from the pretrained samples.
        j_star = float(beta * (torch.logsumexp(r_pre / beta, 0) - math.log(n))) if beta > 0 else float(r_pre.max())
        m_pre, m_fin = self.image_metrics(pre.xs[-1]), self.image_metrics(x)
        out = {"reward_pretrained": float(r_pre.mean()), "reward_pretrained_se": se(r_pre),
               "reward_final": float(rewards.mean()), "reward_final_se": se(rewards.double()),
               "reward_gain_se": se(rewards.double() - r_pre),
               "kl_path": float(kl_path.mean()), "kl_path_se": se(kl_path.double()),
               "objective": float(obj.mean()), "objective_se": se(obj), "objective_pretrained": float(r_pre.mean()),
               "objective_opt_bound": j_star, "beta": beta, "reward": self.preset.reward,
               "n_eval": n}
        for k, v in m_pre.items():
            out[f"{k}_pretrained"] = v
        for k, v in m_fin.items():
            out[f"{k}_final"] = v
        return out

    def write_artifacts(self, out: Path, ev: Rollout) -> None:
        """Sample grids of the pretrained and the fine-tuned sampler (same noise) in the run directory."""
        from .plots import save_before_after

        if self._pre_eval is not None:
            save_before_after(self._pre_eval, ev.xs[-1], Path(out) / "samples.png",
                              title=f"{self.cfg.algo} on {self.cfg.preset} (beta = {self.beta:g})")
