"""The five toy presets have exactly their documented parameters (sacode.theory.presets, the book's appendix).

| preset                  | b_min, b_max | data                                   | r(x)       | beta |
| gauss1d-linear          | 0.1, 20      | N(0.5, 0.8^2)                          | x          | 0.5  |
| gauss1d-linear-short    | 0.1, 2       | N(0.5, 0.8^2)                          | x          | 0.5  |
| gauss1d-quadratic       | 0.1, 20      | N(0.5, 0.8^2)                          | -(x - 2)^2 | 1.0  |
| gauss1d-quadratic-short | 0.1, 2       | N(0.5, 0.8^2)                          | -(x - 2)^2 | 1.0  |
| mixture2d-linear        | 0.1, 20      | 8 equal-weight N(2(cos, sin)(2 pi k/8), 0.2^2 I) | x_1 | 0.5 |
VP SDE with T = 1; the reverse sampler starts from N(0, I).
"""
from __future__ import annotations

import math

import pytest
import torch

from sacode.theory.presets import TOY_PRESETS, ToyPreset, toy_preset
from sacode.dynamics.sde import VPSDE

TABLE = {
    "gauss1d-linear": (20.0, "gauss", "linear", 0.5),
    "gauss1d-linear-short": (2.0, "gauss", "linear", 0.5),
    "gauss1d-quadratic": (20.0, "gauss", "quadratic", 1.0),
    "gauss1d-quadratic-short": (2.0, "gauss", "quadratic", 1.0),
    "mixture2d-linear": (20.0, "ring", "linear1", 0.5),
}


def test_exactly_five_presets():
    assert tuple(TOY_PRESETS) == tuple(TABLE)


@pytest.mark.parametrize("name", list(TABLE))
def test_preset_parameters(name):
    b_max, data_kind, reward_kind, beta = TABLE[name]
    p = toy_preset(name)
    assert isinstance(p, ToyPreset) and p.name == name
    assert p.beta == beta
    # SDE: VP, b(s) = 0.1 + (b_max - 0.1) s, T = 1, prior N(0, I)
    assert type(p.sde) is VPSDE
    assert (p.sde.b_min, p.sde.b_max, p.sde.T) == (0.1, b_max, 1.0)
    assert p.sde.prior_std() == 1.0
    s = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(p.sde.b(s), 0.1 + (b_max - 0.1) * s, rtol=1e-15, atol=0)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    if data_kind == "gauss":
        assert p.event_shape == () and p.data.K == 1
        assert float(p.data.means[0, 0]) == 0.5
        assert float(p.data.covs[0, 0, 0]) == pytest.approx(0.64, rel=1e-15)
        pts = x
    else:
        d = p.data
        assert p.event_shape == (2,) and d.K == 8
        torch.testing.assert_close(d.weights, torch.full((8,), 1 / 8, dtype=torch.float64), rtol=0, atol=0)
        ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        torch.testing.assert_close(d.means, 2.0 * torch.stack([ang.cos(), ang.sin()], 1), rtol=0, atol=1e-15)
        torch.testing.assert_close(d.covs, 0.04 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2),
                                   rtol=1e-15, atol=0)
        pts = torch.stack([x, x.flip(0) * 0.7], 1)
    r = p.reward(pts)
    assert r.shape == (pts.shape[0],)
    expected = {"linear": lambda y: y, "quadratic": lambda y: -(y - 2.0) ** 2, "linear1": lambda y: y[:, 0]}
    torch.testing.assert_close(r, expected[reward_kind](pts), rtol=1e-15, atol=1e-15)
    # the reward gradient is the derivative of the reward
    y = pts.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(p.reward(y).sum(), y)
    torch.testing.assert_close(p.reward.grad(pts), g, rtol=1e-15, atol=1e-15)


def test_unknown_preset_raises_with_choices():
    with pytest.raises(KeyError, match="unknown toy preset 'gauss2d'; choose one of gauss1d-linear"):
        toy_preset("gauss2d")
