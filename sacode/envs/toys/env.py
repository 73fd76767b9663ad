"""A toy preset as an environment: the control problem of chapter 3 with an exact or a learned pretrained score."""
from __future__ import annotations

import torch
from torch import Tensor

from ...theory.conditions import Conditions
from ...theory.control import ScoreControlProblem
from ...theory.presets import ToyPreset


class ToyEnv(ScoreControlProblem):
    """``preset``'s control problem. ``pretrained`` is ``"exact"`` (the data's exact score) or a score model
    ``model(s, x)`` (e.g. a ScoreMLP trained by denoising score matching, so that fine-tuning also works when s_pre is
    imperfect)."""

    def __init__(self, preset: ToyPreset, pretrained: str | torch.nn.Module = "exact",
                 dtype: torch.dtype = torch.float64):
        if isinstance(pretrained, str):
            if pretrained != "exact":
                raise ValueError(f"pretrained must be 'exact' or a score model; got {pretrained!r}")
            score = preset.data.score_fn(preset.sde)
        else:
            for p in pretrained.parameters():
                p.requires_grad_(False)
            score = pretrained
        super().__init__(preset.sde, score, preset.reward, preset.beta, preset.event_shape, dtype)
        self.preset, self.data = preset, preset.data

    def pretrained_score(self, s: Tensor, x: Tensor, cond: Conditions | None = None) -> Tensor:
        if isinstance(self.s_pre, torch.nn.Module):       # frozen parameters; gradients may flow to x
            return self.s_pre(s.to(x.dtype), x)
        return self.s_pre(s, x)
